"""Score a CSV with a model exported by `cohort-coordinator export-model`, outside Cohort.

Needs only numpy and safetensors (`pip install numpy safetensors`); everything else — the
input order, one-hot levels, missing-value rule and the federated mean/std — is read from the
file. Prints one probability per usable row, then the accuracy when the CSV has the label.

    python3 examples/predict.py model.safetensors data/heart-disease/cleveland.csv
"""

import csv
import json
import sys

import numpy as np
from safetensors import safe_open


def load(path):
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return meta, tensors


def encode(meta, rows, header):
    """Model inputs (float64, before standardisation) and labels, exactly as Cohort encodes."""
    schema = json.loads(meta["cohort.schema"])
    features = schema["features"] or [
        c for c in header if c != schema["label"]["column"] and c not in schema["drop"]
    ]
    features = [c for c in features if c not in schema["drop"]]
    categorical = schema.get("categorical", {})
    label_column = schema["label"]["column"]
    x, y, lines = [], [], []
    for line, row in rows:
        value = lambda c: None if row[c].strip() in ("", "?") else float(row[c])
        inputs, skip = [], False
        for c in features:
            v = value(c)
            if v is None and schema["missing"] == "drop_row":
                skip = True
                break
            if c in categorical:
                levels = categorical[c]
                if v is None:
                    inputs += [None] * (len(levels) - 1)
                elif v not in levels:
                    raise ValueError(f"line {line}: {c} = {v} is not one of {levels}")
                else:
                    inputs += [1.0 if v == level else 0.0 for level in levels[1:]]
            else:
                inputs.append(v)
        if skip:
            continue
        x.append(inputs)
        lines.append(line)
        if label_column in row and value(label_column) is not None:
            y.append(1.0 if value(label_column) > schema["label"]["greater_than"] else 0.0)
    return x, (np.array(y) if len(y) == len(x) else None), lines


def predict(meta, tensors, x):
    mean, std = tensors["preprocess.mean"], tensors["preprocess.std"]
    # Missing values become the mean: 0 after standardisation.
    z = np.array(
        [[0.0 if v is None else (v - m) / s for v, m, s in zip(row, mean, std)] for row in x]
    ).astype(np.float32)
    layers = sorted({int(n.split(".")[0]) for n in tensors if not n.startswith("preprocess.")})
    h = z
    for i, layer in enumerate(layers):
        h = h @ tensors[f"{layer}.weight"].T + tensors[f"{layer}.bias"]
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)  # ReLU between linear layers
    return 1.0 / (1.0 + np.exp(-h[:, 0]))


def main():
    meta, tensors = load(sys.argv[1])
    with open(sys.argv[2], newline="") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames]
        rows = [(i + 2, {k.strip(): v for k, v in r.items()}) for i, r in enumerate(reader)]
    x, y, lines = encode(meta, rows, header)
    p = predict(meta, tensors, x)
    for line, prob in zip(lines, p):
        print(f"{line},{prob:.6f}")
    if y is not None:
        accuracy = float(np.mean((p >= 0.5) == (y >= 0.5)))
        print(f"accuracy {accuracy:.6f} on {len(y)} rows", file=sys.stderr)


if __name__ == "__main__":
    main()
