"""Score a CSV with a model exported by `cohort-coordinator export-model`, outside Cohort.

Needs only numpy and safetensors (`pip install numpy safetensors`); everything else — the
input order, one-hot levels, missing-value rule, the federated mean/std, the task (binary,
multiclass, regression), class names and the label's scaling — is read from the file.

Prints one line per usable row: `line,probability` (binary: of the positive class),
`line,class` (multiclass: the predicted class's name) or `line,value` (regression, in the
label's units); then, when the CSV has the label, the task's metric on stderr:
`accuracy X on N rows` or `rmse X on N rows`.

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


def task_of(meta):
    """The task: {"kind", "label", "greater_than" | "classes" | "loss", ...}."""
    if "cohort.task" not in meta:  # exported before tasks: binary, from the schema's label
        label = json.loads(meta["cohort.schema"])["label"]
        return {"kind": "binary", "label": label["column"], "greater_than": label["greater_than"]}
    return json.loads(meta["cohort.task"])


def target(task, value):
    """The training target of a label value: 0/1, a class index, or the value itself."""
    if task["kind"] == "binary":
        return 1.0 if value > task["greater_than"] else 0.0
    if task["kind"] == "multiclass":
        return float(task["classes"].index(value))
    return value


def encode(meta, rows, header):
    """Model inputs (float64, before standardisation) and labels, exactly as Cohort encodes."""
    schema = json.loads(meta["cohort.schema"])
    task = task_of(meta)
    label_column = task["label"]
    features = schema.get("features") or [
        c for c in header if c != label_column and c not in schema.get("drop", [])
    ]
    features = [c for c in features if c not in schema.get("drop", [])]
    categorical = schema.get("categorical", {})
    labelled = label_column in header
    x, y, lines = [], [], []
    for line, row in rows:
        value = lambda c: None if row[c].strip() in ("", "?") else float(row[c])
        inputs, skip = [], False
        # A row without its label is dropped, as Cohort drops it (a label is never imputed).
        if labelled and value(label_column) is None:
            continue
        for c in features:
            v = value(c)
            if v is None and schema.get("missing", "drop_row") == "drop_row":
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
        if labelled:
            y.append(target(task, value(label_column)))
    return x, (np.array(y) if labelled else None), lines


def outputs(meta, tensors, x):
    """The network's raw outputs, [n, outputs]."""
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
    return h


def predict(meta, tensors, x):
    """Binary: P(positive); multiclass: the class index; regression: the value in label units."""
    task, h = task_of(meta), outputs(meta, tensors, x).astype(np.float64)
    if task["kind"] == "binary":
        return 1.0 / (1.0 + np.exp(-h[:, 0]))
    if task["kind"] == "multiclass":
        return np.argmax(h, axis=1).astype(np.float64)
    if task.get("loss") == "poisson":
        return np.exp(h[:, 0])
    if "preprocess.label" in tensors:
        label_mean, label_std = tensors["preprocess.label"]
        return h[:, 0] * label_std + label_mean
    return h[:, 0]


def main():
    meta, tensors = load(sys.argv[1])
    if json.loads(meta.get("cohort.images", "null")) is not None or "params" in tensors:
        sys.exit("an image or custom model: score it with `cohort-agent predict --images` "
                 "or the model's own code (this script reads CSV models)")
    task = task_of(meta)
    names = json.loads(meta.get("cohort.class_names", "[]"))
    with open(sys.argv[2], newline="") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames]
        rows = [(i + 2, {k.strip(): v for k, v in r.items()}) for i, r in enumerate(reader)]
    x, y, lines = encode(meta, rows, header)
    p = predict(meta, tensors, x)
    for line, value in zip(lines, p):
        if task["kind"] == "multiclass":
            print(f"{line},{names[int(value)]}")
        else:
            print(f"{line},{value:.6f}")
    if y is None:
        return
    if task["kind"] == "binary":
        accuracy = float(np.mean((p >= 0.5) == (y >= 0.5)))
        print(f"accuracy {accuracy:.6f} on {len(y)} rows", file=sys.stderr)
    elif task["kind"] == "multiclass":
        accuracy = float(np.mean(p == y))
        print(f"accuracy {accuracy:.6f} on {len(y)} rows", file=sys.stderr)
    else:
        rmse = float(np.sqrt(np.mean((p - y) ** 2)))
        print(f"rmse {rmse:.6f} on {len(y)} rows", file=sys.stderr)


if __name__ == "__main__":
    main()
