//! Dataset runs (`--inputs`, `--shard`, `--resume`, `gradcam merge`): shards merge to the
//! unsharded run, a killed run resumes to the same records, broken inputs are recorded and the
//! run goes on, memory does not grow with the list.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{err, ok};

/// Runs `gradcam` from the repository's root, where the shipped models' default paths point.
pub fn gradcam(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(crate::repo(".")).output().expect("gradcam runs")
}

/// `n` generated scenes (the test split of a fresh ShapeScenes) in `dir/test`.
pub fn scenes(dir: &Path, n: usize) -> PathBuf {
    ok(&gradcam(&["scenes", "--out", &dir.display().to_string(), "--n", &n.to_string(), "--split-fractions", "0,0,1", "--seed", "7"]));
    dir.join("test")
}

/// A text list of `n` image paths, cycling through the scenes' images.
fn list(dir: &Path, images: &Path, n: usize) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(images).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let file = dir.join(format!("list{n}.txt"));
    std::fs::write(&file, (0..n).map(|i| format!("{}\n", files[i % files.len()].display())).collect::<String>()).unwrap();
    file
}

fn run(args: &[&str]) -> String {
    ok(&gradcam(args))
}

fn records(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("records.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Two records' JSON equal, numbers within `tol`.
pub fn same(a: &Value, b: &Value, tol: f64, at: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= tol, "{at}: {x} vs {y}"),
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: lengths");
            x.iter().zip(y).enumerate().for_each(|(i, (x, y))| same(x, y, tol, &format!("{at}[{i}]")));
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{at}: fields");
            x.iter().for_each(|(k, v)| same(v, &y[k], tol, &format!("{at}.{k}")));
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

pub fn same_records(a: &[Value], b: &[Value]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x["index"], i, "records in input order");
        same(x, y, 1e-6, &format!("record {i}"));
    }
}

#[test]
fn four_shards_merge_to_the_unsharded_run_and_a_killed_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let images = scenes(dir.path(), 24).join("images");
    let list = list(dir.path(), &images, 24);
    let (l, d) = (list.display().to_string(), |n: &str| dir.path().join(n).display().to_string());
    run(&["caption", "--inputs", &l, "--out", &d("all"), "--batch-size", "5"]);
    let summary: Value = serde_json::from_str(&run(&["merge", &d("all")])).unwrap();
    assert_eq!((summary["count"].as_u64(), summary["errors"].as_u64()), (Some(24), Some(0)));
    assert!(summary["images_per_s"].as_f64().unwrap() > 0.0);
    let whole = records(&dir.path().join("all"));
    assert_eq!(whole[3]["image"], images.join("000003.png").display().to_string());
    assert!(whole.iter().all(|r| r["words"][0]["overlay"] == "" && !r["caption"].as_str().unwrap().is_empty()), "no pictures without --overlays");
    for i in 0..4 {
        run(&["caption", "--inputs", &l, "--out", &d("four"), "--shard", &format!("{i}/4"), "--batch-size", "2"]);
    }
    let e = err(&gradcam(&["caption", "--inputs", &l, "--out", &d("four"), "--shard", "1/4"]));
    assert!(e.contains("--resume"), "records are never overwritten: {e}");
    let summary: Value = serde_json::from_str(&run(&["merge", &d("four")])).unwrap();
    assert_eq!(summary["shards"].as_array().unwrap().iter().map(|s| s["count"].as_u64().unwrap()).collect::<Vec<_>>(), [6, 6, 6, 6]);
    same_records(&records(&dir.path().join("four")), &whole);

    // A run killed (SIGKILL) after a few batches, continued with --resume.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gradcam"))
        .current_dir(crate::repo("."))
        .args(["caption", "--inputs", &l, "--out", &d("killed"), "--batch-size", "1", "--method", "gradcam,gradcam++,layercam"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let file = dir.path().join("killed/records-0-of-1.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&file).map_or(0, |t| t.lines().count()) < 3 && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = std::fs::read_to_string(&file).unwrap().lines().count();
    assert!((3..24).contains(&done), "killed after {done} records");
    let e = err(&gradcam(&["merge", &d("killed")]));
    assert!(e.contains("unfinished") || e.contains("cut line"), "{e}");
    let o = gradcam(&["caption", "--inputs", &l, "--out", &d("killed"), "--batch-size", "4", "--method", "gradcam,gradcam++,layercam", "--resume"]);
    let note = String::from_utf8_lossy(&o.stderr).into_owned();
    ok(&o);
    assert!(note.contains("recorded before"), "{note}");
    run(&["merge", &d("killed")]);
    run(&["caption", "--inputs", &l, "--out", &d("three"), "--method", "gradcam,gradcam++,layercam"]);
    run(&["merge", &d("three")]);
    same_records(&records(&dir.path().join("killed")), &records(&dir.path().join("three")));
}

#[test]
fn broken_inputs_are_recorded_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let images = scenes(dir.path(), 6).join("images");
    std::fs::write(images.join("000002.png"), b"not a png").unwrap();
    let folder = images.display().to_string();
    let out = dir.path().join("out");
    let o = &out.display().to_string();
    run(&["caption", "--inputs", &folder, "--out", o, "--overlays", "--maps", "npy"]);
    run(&["merge", o]);
    let r = records(&out);
    assert_eq!(r.len(), 6);
    assert_eq!(r[2].as_object().unwrap().keys().collect::<Vec<_>>(), ["error", "image", "index"]);
    assert!(r[2]["error"].as_str().unwrap().contains("000002.png"), "{}", r[2]);
    let summary: Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["errors"], 1);
    // --overlays: the pictures, named by index; --maps npy: the words' maps as [words, h, w].
    let overlay = r[5]["words"][0]["overlay"].as_str().unwrap();
    assert!(overlay.contains("overlays/000000005_000005_00_") && Path::new(overlay).exists(), "{overlay}");
    assert!(Path::new(r[5]["strip"].as_str().unwrap()).exists());
    let npy = std::fs::read(out.join("maps/000000005.npy")).unwrap();
    let words = r[5]["words"].as_array().unwrap().len();
    assert!(String::from_utf8_lossy(&npy[..128]).contains(&format!("'shape': ({words}, 16, 16)")));
    assert!(!out.join("maps/000000002.npy").exists());
}

#[test]
fn every_explaining_command_runs_over_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let split = scenes(dir.path(), 4);
    let d = |n: &str| dir.path().join(n).display().to_string();
    // vqa: a questions file, each question with its image.
    run(&["vqa", "--inputs", &split.join("questions.json").display().to_string(), "--out", &d("vqa"), "--counterfactual", "--shard", "0/2"]);
    run(&["vqa", "--inputs", &split.join("questions.json").display().to_string(), "--out", &d("vqa"), "--counterfactual", "--shard", "1/2"]);
    run(&["merge", &d("vqa")]);
    let r = records(&dir.path().join("vqa"));
    let questions: Value = serde_json::from_slice(&std::fs::read(split.join("questions.json")).unwrap()).unwrap();
    assert_eq!(r.len(), questions["questions"].as_array().unwrap().len());
    assert_eq!(r[1]["question"], questions["questions"][1]["question"]);
    assert_eq!(r[1]["question_id"], questions["questions"][1]["question_id"]);
    let e = err(&gradcam(&["vqa", "--inputs", &split.join("images").display().to_string(), "--out", &d("vqa2")]));
    assert!(e.contains("questions.json"), "{e}");
    // classify: a COCO instances file (its images/ beside it).
    let w = crate::effnet_weights().display().to_string();
    run(&["classify", "--inputs", &split.join("instances.json").display().to_string(), "--weights", &w, "--out", &d("cls"), "--counterfactual"]);
    run(&["merge", &d("cls")]);
    let r = records(&dir.path().join("cls"));
    assert_eq!(r.len(), 4);
    assert_eq!(r[0]["explanations"].as_array().unwrap().len(), 2, "the class and its counterfactual");
    assert!(r[3]["image"].as_str().unwrap().ends_with("images/000003.png"));
    // match: the same texts on every image.
    run(&["match", "--inputs", &split.join("images").display().to_string(), "--text", "a red circle", "--out", &d("clip")]);
    run(&["merge", &d("clip")]);
    assert_eq!(records(&dir.path().join("clip")).len(), 4);
}

#[test]
fn dataset_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let images = scenes(dir.path(), 2).join("images").display().to_string();
    let out = dir.path().join("o").display().to_string();
    for (args, says) in [
        (vec!["--shard", "4/4"], "0 to 3"),
        (vec!["--shard", "x"], "I/N"),
        (vec!["--batch-size", "0"], "--batch-size 0"),
    ] {
        let e = err(&gradcam(&[&["caption", "--inputs", &images, "--out", &out][..], &args].concat()));
        assert!(e.contains(says), "{args:?}: {e}");
    }
    let e = err(&gradcam(&["caption", "--shard", "0/2", &images]));
    assert!(e.contains("--inputs"), "{e}");
    let e = err(&gradcam(&["merge", &out]));
    assert!(e.contains("records-I-of-N.jsonl") || e.contains("o"), "{e}");
    run(&["caption", "--inputs", &images, "--out", &out, "--shard", "0/2"]);
    let e = err(&gradcam(&["merge", &out]));
    assert!(e.contains("records-1-of-2.jsonl"), "a missing shard is named: {e}");
    let e = err(&gradcam(&["caption", "--inputs", &dir.path().join("nothing.txt").display().to_string(), "--out", &out]));
    assert!(e.contains("nothing.txt"), "{e}");
}

/// The peak resident memory of a command (GNU time, installed by `.ci/run`), in KiB.
fn peak_kib(args: &[&str]) -> u64 {
    let o = std::process::Command::new("/usr/bin/time").arg("-v").arg(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(crate::repo(".")).output().expect("GNU time at /usr/bin/time (.ci/run installs `time`)");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    e.lines().find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes): ")).unwrap().parse().unwrap()
}

#[test]
fn memory_does_not_grow_with_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let images = scenes(dir.path(), 50).join("images");
    let (short, long) = (list(dir.path(), &images, 50), list(dir.path(), &images, 400));
    let go = |l: &Path, out: &str| peak_kib(&["caption", "--inputs", &l.display().to_string(), "--out", &dir.path().join(out).display().to_string(), "--method", "gradcam,layercam"]);
    let (a, b) = (go(&short, "a"), go(&long, "b"));
    assert!((b as f64) <= 1.2 * a as f64, "peak RSS {b} KiB over 400 inputs, {a} KiB over 50");
    assert_eq!(std::fs::read_to_string(dir.path().join("b/records-0-of-1.jsonl")).unwrap().lines().count(), 400);
}
