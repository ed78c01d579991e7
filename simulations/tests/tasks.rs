//! Tasks other than binary classification, on the shipped heart-disease data, through the
//! whole system: the shipped example scenarios (multiclass severity, regression of the
//! maximum heart rate) run with secure aggregation over real gRPC and mTLS, with the
//! centralised and site-alone references; each run's model is exported and scored again,
//! by `cohort-agent`'s predict and by `examples/predict.py` (numpy), on each site's test CSV,
//! and must reproduce the metric the federation reported for that site.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cohort_agent::predict::ExportedModel;
use cohort_sim::run::{Summary, run_file_with};

use cohort_testkit::heart::{self, SITES};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shipped example with `rounds` rounds and each site's data as a train and a test file.
fn scenario(dir: &Path, example: &str, rounds: u64) -> PathBuf {
    let mut text = std::fs::read_to_string(repo().join("examples").join(example)).unwrap();
    assert!(text.contains("rounds = 15"));
    text = text.replace("rounds = 15", &format!("rounds = {rounds}"));
    for site in SITES {
        let (train, test) = heart::split(site, dir);
        let shipped = format!("csv = \"../data/heart-disease/{site}.csv\"");
        assert!(text.contains(&shipped), "{example} names {site}'s CSV");
        text = text.replace(&shipped, &format!("csv = {train:?}\ntest_csv = {test:?}"));
    }
    let path = dir.join(example);
    std::fs::write(&path, text).unwrap();
    path
}

fn run_and_export(dir: &Path, example: &str) -> (Summary, PathBuf) {
    let out = dir.join("out");
    let summary = run_file_with(&scenario(dir, example, 4), &out, true).expect("scenario runs");
    assert_eq!(summary.rounds_completed, 4);
    assert!(summary.secure);
    assert_eq!(summary.coordinator_received.plain_updates, 0);
    let config =
        cohort_coordinator::CoordinatorConfig::load(&out.join("coordinator.toml")).unwrap();
    let model = out.join("model.safetensors");
    cohort_coordinator::export::export_model(&config, None, &model).unwrap();
    (summary, model)
}

/// `examples/predict.py` on `csv`: (rows scored, the value of `metric`). None when Python
/// or its packages are missing outside CI.
fn python(model: &Path, csv: &Path, metric: &str) -> Option<(usize, f64)> {
    let out = cohort_testkit::predict::predict(model, csv)?;
    assert_eq!(out.metric, metric, "predict.py reports the task's metric");
    Some((out.rows.len(), out.value))
}

#[test]
fn multiclass_severity_trains_securely_and_its_export_reproduces_each_sites_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let (s, model) = run_and_export(dir.path(), "heart-disease-multiclass.toml");
    assert_eq!(
        (s.task.as_str(), s.metric.as_str()),
        ("multiclass", "accuracy")
    );
    assert!(
        s.final_.loss < s.initial.loss,
        "{} -> {}",
        s.initial.loss,
        s.final_.loss
    );
    // Five classes: per-class recall, macro-F1, no AUC; the confusion matrix summed over the
    // sites counts every test row once.
    let w = &s.final_.weighted;
    assert_eq!(w.per_class_recall.len(), 5);
    assert!(w.macro_f1.is_some() && w.balanced_accuracy.is_some());
    assert_eq!(w.auc, None);
    assert_eq!(s.final_.confusion.len(), 25);
    let test_rows: u64 = s.per_site.values().map(|r| r.test_examples).sum();
    assert_eq!(s.final_.confusion.iter().sum::<u64>(), test_rows);
    let correct: u64 = (0..5).map(|c| s.final_.confusion[c * 5 + c]).sum();
    assert!((w.accuracy.unwrap() - correct as f64 / test_rows as f64).abs() < 1e-12);
    // Hungary's records hold classes 0 and 1 only: its recall of the others is undefined,
    // not zero, and the mean of sites averages over the sites that have the class.
    let hungary = &s.per_site["hungary"].metrics;
    assert_eq!(hungary.per_class_recall[2..], [None, None, None]);
    // The references were trained and judged on the same test rows.
    for reference in [s.pooled.as_ref().unwrap(), s.alone.as_ref().unwrap()] {
        assert_eq!(reference.per_site.len(), 4);
        assert!(reference.weighted.accuracy.is_some());
    }

    let exported = ExportedModel::read(&model).unwrap();
    assert_eq!(exported.spec.outputs, 5);
    for site in SITES {
        let test = dir.path().join(format!("{site}-test.csv"));
        let scored = exported.score(&test).unwrap();
        let reported = &s.per_site[site];
        let e = scored.evaluation.unwrap();
        assert_eq!(e.examples as u64, reported.test_examples, "{site}");
        assert_eq!(
            e.metrics(),
            reported.metrics,
            "{site}: predict reproduces the report"
        );
        if let Some((rows, accuracy)) = python(&model, &test, "accuracy") {
            assert_eq!(rows as u64, reported.test_examples, "{site}");
            let one_row = 1.0 / rows as f64;
            assert!(
                (accuracy - reported.accuracy.unwrap()).abs() <= one_row + 1e-6,
                "{site}: predict.py {accuracy} vs {:?}",
                reported.accuracy
            );
        }
    }
}

#[test]
fn regression_reports_errors_in_beats_per_minute_and_its_export_reproduces_them() {
    let dir = tempfile::tempdir().unwrap();
    let (s, model) = run_and_export(dir.path(), "heart-disease-regression.toml");
    assert_eq!((s.task.as_str(), s.metric.as_str()), ("regression", "rmse"));
    assert_eq!(s.final_.accuracy, None);
    assert!(s.final_.confusion.is_empty());
    let (before, after) = (
        s.initial.weighted.rmse.unwrap(),
        s.final_.weighted.rmse.unwrap(),
    );
    // The initial model predicts the federation's mean heart rate: its RMSE is about the
    // label's standard deviation, in beats per minute (not in standardised units).
    assert!(before > 15.0 && before < 40.0, "{before}");
    assert!(after < before, "{before} -> {after}");
    assert!(s.final_.weighted.r2.unwrap() > 0.0);
    assert!(s.pooled.as_ref().unwrap().weighted.rmse.is_some());

    let exported = ExportedModel::read(&model).unwrap();
    let (mean, std) = exported.label_scaling.expect("the label's scaling travels");
    assert!(mean > 100.0 && mean < 180.0 && std > 10.0, "{mean} {std}");
    for site in SITES {
        let test = dir.path().join(format!("{site}-test.csv"));
        let reported = &s.per_site[site];
        let e = exported.score(&test).unwrap().evaluation.unwrap();
        assert_eq!(e.examples as u64, reported.test_examples, "{site}");
        let (ours, theirs) = (e.metrics().rmse.unwrap(), reported.metrics.rmse.unwrap());
        assert!(
            (ours - theirs).abs() < 1e-9 * theirs,
            "{site}: {ours} vs {theirs}"
        );
        if let Some((rows, rmse)) = python(&model, &test, "rmse") {
            assert_eq!(rows as u64, reported.test_examples, "{site}");
            assert!(
                (rmse - theirs).abs() < 1e-3,
                "{site}: predict.py {rmse} vs {theirs}"
            );
        }
    }
}

#[test]
fn an_evaluation_only_site_is_judged_apart_and_never_trains() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = std::fs::read_to_string(repo().join("examples/heart-disease.toml")).unwrap();
    text = text.replace("rounds = 15", "rounds = 3");
    for site in SITES {
        let csv = repo().join(format!("data/heart-disease/{site}.csv"));
        let role = if site == "switzerland" {
            "\nrole = \"evaluate\""
        } else {
            ""
        };
        text = text.replace(
            &format!("csv = \"../data/heart-disease/{site}.csv\""),
            &format!("csv = {csv:?}{role}"),
        );
    }
    let scenario = dir.path().join("held-out.toml");
    std::fs::write(&scenario, text).unwrap();
    let s = run_file_with(&scenario, &dir.path().join("out"), true).expect("runs");
    assert_eq!(s.rounds_completed, 3);
    // Three sites train (and sum securely); the fourth only evaluates, on all its rows.
    assert!(s.rounds.iter().all(|r| r.sites == 3), "{:?}", s.rounds);
    let swiss = &s.per_site["switzerland"];
    assert!(swiss.evaluate_only);
    assert_eq!(swiss.examples, 0);
    assert_eq!(
        swiss.test_examples, 46,
        "every usable Swiss row is a test row"
    );
    // Its metrics are reported apart, and the training sites' mean leaves it out.
    let held_out = s.final_.held_out.as_ref().expect("held-out metrics");
    assert_eq!(held_out.weighted.accuracy, swiss.accuracy);
    let trainers: Vec<f64> = s
        .per_site
        .values()
        .filter(|r| !r.evaluate_only)
        .map(|r| r.accuracy.unwrap())
        .collect();
    assert_eq!(trainers.len(), 3);
    let mean = trainers.iter().sum::<f64>() / 3.0;
    assert!((s.final_.accuracy.unwrap() - mean).abs() < 1e-12);
    // The references are judged on it apart too.
    assert!(s.pooled.as_ref().unwrap().held_out.is_some());
    assert!(
        !s.alone
            .as_ref()
            .unwrap()
            .per_site
            .contains_key("switzerland")
    );
}

#[test]
fn a_cnn_learns_generated_images_from_folders_and_a_manifest_and_its_export_reproduces_them() {
    use cohort_agent::data::images::ImageSource;
    use cohort_sim::shapes::{GenArgs, generate};
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("shapes");
    let sites = generate(&GenArgs {
        out: images.clone(),
        sites: 5,
        per_site: 120,
        size: 16,
        seed: 3,
    })
    .unwrap();
    // site2 lists its images in a manifest instead of being read as a folder tree.
    let mut manifest = String::from("path,label\n");
    for (path, class) in
        cohort_agent::data::images::list(&ImageSource::Folder(sites[1].clone())).unwrap()
    {
        let relative = path.strip_prefix(&images).unwrap();
        manifest.push_str(&format!("{},{class}\n", relative.display()));
    }
    std::fs::write(images.join("site2.csv"), manifest).unwrap();
    let scenario = format!(
        r#"
rounds = 4
secure = true
test_fraction = 0.25
split_seed = 1

[[sites]]
name = "site1"
images = {s1:?}
test_csv = {s5:?}

[[sites]]
name = "site2"
manifest = {m2:?}

[[sites]]
name = "site3"
images = {s3:?}

[[sites]]
name = "site4"
images = {s4:?}

[schema.images]
channels = 1
height = 16
width = 16

[schema.task]
kind = "multiclass"
label = "shape"
classes = [0, 1, 2, 3]
class_names = ["horizontal", "vertical", "diagonal", "box"]

[model]
kind = "cnn"
layers = [
  {{ type = "conv2d", channels = 6, kernel = 3 }},
  {{ type = "relu" }},
  {{ type = "max_pool", size = 2 }},
  {{ type = "flatten" }},
  {{ type = "dense", units = 24 }},
  {{ type = "relu" }},
]

[training]
learning_rate = 0.003
batch_size = 16
local_steps = 40

[secagg]
quant_bits = 20
max_weight = 1000
"#,
        s1 = sites[0].display().to_string(),
        s3 = sites[2].display().to_string(),
        s4 = sites[3].display().to_string(),
        s5 = sites[4].display().to_string(),
        m2 = images.join("site2.csv").display().to_string(),
    );
    let path = dir.path().join("cnn.toml");
    std::fs::write(&path, scenario).unwrap();
    let out = dir.path().join("out");
    let s = run_file_with(&path, &out, true).expect("the CNN scenario runs");
    assert_eq!(s.rounds_completed, 4);
    assert_eq!(s.coordinator_received.plain_updates, 0);
    let (before, after) = (
        s.initial.weighted.accuracy.unwrap(),
        s.final_.weighted.accuracy.unwrap(),
    );
    // Four classes: chance is 0.25.
    eprintln!("CNN on generated shapes: pooled test accuracy {before:.3} -> {after:.3}");
    assert!(after > 0.6 && after > before + 0.2, "{before} -> {after}");
    assert_eq!(
        s.per_site["site1"].test_examples, 120,
        "site1 is judged on its test folder"
    );

    let config =
        cohort_coordinator::CoordinatorConfig::load(&out.join("coordinator.toml")).unwrap();
    let model = out.join("model.safetensors");
    cohort_coordinator::export::export_model(&config, None, &model).unwrap();
    let exported = ExportedModel::read(&model).unwrap();
    assert!(exported.spec.cnn.is_some());
    assert_eq!(exported.inputs.len(), 256);
    let scored = exported
        .score_images(&ImageSource::Folder(sites[4].clone()))
        .unwrap();
    assert_eq!(scored.files.len(), 120);
    assert_eq!(
        scored.evaluation.unwrap().metrics(),
        s.per_site["site1"].metrics,
        "predict reproduces site1's reported metrics from the file alone"
    );
    // A CSV given to an image model is refused with what to do instead.
    let err = exported
        .score(&repo().join("data/heart-disease/va.csv"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--images"), "{err}");

    // An image of a class the task does not know is named with its file.
    let stray = images.join("site3").join("triangle");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::copy(
        sites[2]
            .join("box")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
        stray.join("t.png"),
    )
    .unwrap();
    let err = cohort_agent::data::images::load(
        &config.schema,
        &ImageSource::Folder(images.join("site3")),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("t.png") && err.contains("\"triangle\""),
        "{err}"
    );
}
