//! Hostile input (issue "no abort, no hang, no runaway memory"): each finding fixed so far, with
//! the input made here.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::repo;

mod messages;
mod onnx;

/// Runs the CLI from the repository root; fails the test if it runs for more than a minute.
pub(crate) fn gradcam(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(repo("")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            panic!("gradcam {args:?} still runs after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

pub(crate) fn fails_with(args: &[&str], message: &str) {
    let o = gradcam(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(matches!(o.status.code(), Some(1 | 2)), "{args:?}: {:?} {stderr}", o.status);
    assert!(stderr.contains(message), "{args:?}: expected {message:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A copy of the test split of the sample scenes.
pub(crate) fn split_copy(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for f in ["captions.json", "instances.json", "questions.json", "annotations.json"] {
        std::fs::copy(repo("data/shapescenes/test").join(f), dir.join(f)).unwrap();
    }
    for f in ["000018.png", "000019.png"] {
        std::fs::copy(repo("data/shapescenes/test/images").join(f), dir.join("images").join(f)).unwrap();
    }
}

pub(crate) fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

#[test]
fn a_fifo_named_as_an_image_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("scene.png");
    mkfifo(&fifo);
    let out = dir.path().join("out");
    fails_with(&["caption", fifo.to_str().unwrap(), "--out", out.to_str().unwrap()], "not a regular file");
    // The same inside a dataset: caption --eval, vqa --eval and dissect read instances.json's images.
    let split = dir.path().join("split");
    split_copy(&split);
    std::fs::remove_file(split.join("images/000019.png")).unwrap();
    mkfifo(&split.join("images/000019.png"));
    let s = split.to_str().unwrap();
    fails_with(&["caption", "--eval", s], "not a regular file");
    fails_with(&["vqa", "--eval", s], "not a regular file");
    fails_with(&["dissect", "--data", s, "--out", out.join("d.json").to_str().unwrap()], "not a regular file");
}

#[test]
fn flags_that_would_exhaust_the_machine_are_refused() {
    fails_with(&["--threads", "100000", "layers"], "--threads 100000: give 1 to 1024");
    fails_with(&["--threads", "0", "layers"], "give 1 to 1024");
    fails_with(&["eval", "deletion", "--model", "models/captioner", "--data", "data/shapescenes/test", "--steps", "1000000"], "more steps than the input has pixels");
}

#[test]
fn vqa_eval_refuses_a_folder_without_questions() {
    let dir = tempfile::tempdir().unwrap();
    split_copy(dir.path());
    std::fs::remove_file(dir.path().join("questions.json")).unwrap();
    std::fs::remove_file(dir.path().join("annotations.json")).unwrap();
    fails_with(&["vqa", "--eval", dir.path().to_str().unwrap()], "no questions.json with annotations.json");
}

#[test]
fn a_config_with_a_huge_image_size_is_refused() {
    for (model, args) in [("captioner", vec!["caption", "data/shapescenes/test/images/000018.png"]), ("vqa", vec!["vqa", "data/shapescenes/test/images/000018.png", "what color is it?"])] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(repo("models").join(model).join(f), dir.path().join(f)).unwrap();
        }
        let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&config).unwrap();
        for size in [100_000u64, 1 << 31] {
            cfg["image_size"] = serde_json::json!(size);
            std::fs::write(dir.path().join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
            let mut a = args.clone();
            a.extend(["--model", dir.path().to_str().unwrap(), "--out", dir.path().to_str().unwrap()]);
            fails_with(&a, "image_size");
        }
    }
}

/// torchvision's ResNet-50 saved with safetensors has a header length whose first byte is 0x80,
/// a pickle's protocol marker: the format is told by the safetensors header, not that byte.
#[test]
fn safetensors_whose_header_length_starts_with_0x80_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let t = candle_core::Tensor::new(&[1f32, 2.0, 3.0], &candle_core::Device::Cpu).unwrap();
    let mut name = String::from("w");
    loop {
        candle_core::safetensors::save(&std::collections::HashMap::from([(name.clone(), t.clone())]), &path).unwrap();
        if std::fs::read(&path).unwrap()[0] == 0x80 {
            break;
        }
        name.push('x');
        assert!(name.len() < 400, "no header length ending in 0x80");
    }
    let w = gradcam_encoders::Weights::load(&path).unwrap();
    assert_eq!(w.names(), vec![name.clone()]);
}

/// A copy of a shipped model folder.
fn model_copy(model: &str, dir: &Path) {
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(repo("models").join(model).join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn non_finite_weights_are_refused_at_load() {
    for (model, args) in [("captioner", vec!["caption", "data/shapescenes/test/images/000018.png"]), ("vqa", vec!["vqa", "data/shapescenes/test/images/000018.png", "what color is it?"])] {
        for bad in [f32::NAN, f32::INFINITY] {
            let dir = tempfile::tempdir().unwrap();
            model_copy(model, dir.path());
            let path = dir.path().join("model.safetensors");
            let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
            let name = tensors.keys().find(|k| k.ends_with("weight")).unwrap().clone();
            let t = &tensors[&name];
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let middle = v.len() / 2;
            v[middle] = bad;
            tensors.insert(name.clone(), candle_core::Tensor::from_vec(v, t.shape(), &candle_core::Device::Cpu).unwrap());
            candle_core::safetensors::save(&tensors, &path).unwrap();
            let mut a = args.clone();
            a.extend(["--model", dir.path().to_str().unwrap(), "--out", dir.path().to_str().unwrap()]);
            fails_with(&a, &format!("tensor \"{name}\" holds NaN or infinite values"));
        }
    }
}

#[test]
fn a_tokenizer_with_misplaced_special_tokens_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    model_copy("captioner", dir.path());
    let path = dir.path().join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // <end> and the word with id 7 trade places.
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    let word = vocab.iter().find(|(_, id)| id.as_u64() == Some(7)).map(|(w, _)| w.clone()).unwrap();
    vocab.insert("<end>".into(), serde_json::json!(7));
    vocab.insert(word, serde_json::json!(2));
    for a in t["added_tokens"].as_array_mut().unwrap() {
        if a["content"] == "<end>" {
            a["id"] = serde_json::json!(7);
        }
    }
    std::fs::write(&path, serde_json::to_string(&t).unwrap()).unwrap();
    fails_with(&["caption", "data/shapescenes/test/images/000018.png", "--model", dir.path().to_str().unwrap(), "--out", dir.path().to_str().unwrap()], "must have ids 0 to 3");
}

#[test]
fn training_settings_that_cannot_train_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    for lr in ["NaN", "inf", "1e30", "0", "-1"] {
        for what in ["captioner", "vqa"] {
            fails_with(&["train", what, "--data", "data/shapescenes", "--out", out.to_str().unwrap(), &format!("--lr={lr}")], "learning rate");
            assert!(!out.exists(), "train {what} --lr {lr} wrote {}", out.display());
        }
    }
    for (flag, value) in [("--batch-size", "0"), ("--hidden", "0"), ("--epochs", "0")] {
        fails_with(&["train", "captioner", "--data", "data/shapescenes", "--out", out.to_str().unwrap(), flag, value], "at least 1");
        assert!(!out.exists());
    }
}

#[test]
fn a_caption_longer_than_the_model_takes_is_refused_at_once() {
    let words = vec!["red"; 24_000].join(" ");
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    fails_with(&["caption", "data/shapescenes/test/images/000018.png", "--caption", &words, "--out", dir.path().to_str().unwrap()], "the caption has 24000 words; the model takes at most 20");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn smaller_things() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    for caption in ["<end> <end>", "<start> a red circle"] {
        fails_with(&["caption", "data/shapescenes/test/images/000018.png", "--caption", caption, "--out", out], "not words to explain");
    }
    for (flag, value) in [("--iou-threshold", "NaN"), ("--quantile", "0"), ("--quantile", "1.5")] {
        fails_with(&["dissect", "--data", "data/shapescenes/test", flag, value, "--out", &format!("{out}/d.json")], "must be in (0, 1)");
    }
    // An evaluation of nothing is refused, not reported as zeros.
    for cmd in ["caption", "vqa"] {
        fails_with(&[cmd, "--eval", "data/shapescenes/test", "--limit", "0"], "at least 1");
    }
    // The README's form of --split-fractions, with commas.
    let o = gradcam(&["scenes", "--out", &format!("{out}/scenes"), "--n", "10", "--split-fractions", "0.8,0.1,0.1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A black RGB PNG of `w` x `h`, written row by row (never held in memory whole).
fn black_png(path: &Path, w: u32, h: u32) {
    use std::io::Write;
    let crc = |kind: &[u8], data: &[u8]| {
        let mut c = 0xffff_ffffu32;
        for &b in kind.iter().chain(data) {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    };
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        out.extend(kind);
        out.extend(data);
        out.extend(crc(kind, data).to_be_bytes());
    };
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let row = vec![0u8; 1 + 3 * w as usize];
    for _ in 0..h {
        z.write_all(&row).unwrap();
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &z.finish().unwrap());
    chunk(&mut png, b"IEND", b"");
    std::fs::write(path, png).unwrap();
}

/// Peak RSS of a finished child, from `/usr/bin/time -f %M` (KiB).
pub(crate) fn run_measured(args: &[&str]) -> (Output, u64, Duration) {
    let t = Instant::now();
    let o = Command::new("/usr/bin/time").arg("-f").arg("rss %M").arg(env!("CARGO_BIN_EXE_gradcam")).args(args).current_dir(repo("")).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let rss = stderr.lines().rev().find_map(|l| l.strip_prefix("rss ")).and_then(|v| v.trim().parse().ok()).expect("GNU time's report");
    (o, rss, t.elapsed())
}

#[test]
fn huge_and_extreme_images_are_answered_in_seconds_at_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (huge, strip, photo) = (dir.path().join("huge.png"), dir.path().join("strip.png"), dir.path().join("photo.png"));
    black_png(&huge, 16384, 16384);
    black_png(&strip, 16384, 1);
    black_png(&photo, 8000, 6000);
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let q = "what color is it?";
    for (args, ok) in [
        (vec!["caption", huge.to_str().unwrap()], false),
        (vec!["vqa", huge.to_str().unwrap(), q], false),
        (vec!["classify", huge.to_str().unwrap()], false),
        (vec!["classify", strip.to_str().unwrap()], true),
        (vec!["caption", strip.to_str().unwrap()], true),
        (vec!["vqa", strip.to_str().unwrap(), q], true),
        (vec!["caption", photo.to_str().unwrap(), "--method", "gradcam,gradcam++"], true),
        (vec!["vqa", photo.to_str().unwrap(), q, "--counterfactual"], true),
    ] {
        let mut args = args;
        args.extend(["--out", o]);
        let (output, rss, took) = run_measured(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.success(), ok, "{args:?}: {stderr}");
        if !ok {
            assert!(stderr.contains("too large") && stderr.contains("megapixels; the limit is 50"), "{args:?}: {stderr}");
        }
        eprintln!("{args:?}: {:.2} s, {rss} KiB", took.as_secs_f64());
        assert!(rss < 1 << 20 && took < Duration::from_secs(20), "{args:?}: {rss} KiB, {took:?}");
    }
    // Pictures on a large photo are drawn at most 1024 px on a side.
    let word = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with("photo_00_")).expect("the first word's overlay");
    assert_eq!(image::image_dimensions(&word).unwrap(), (1024, 768));
}

/// A PyTorch zip checkpoint of one float tensor `w`: a view with `size` and `stride` over a
/// storage of four floats.
fn zip_pth(path: &Path, size: [i32; 2], stride: [i32; 2]) {
    use std::io::Write;
    let text = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: i32| {
        p.push(b'J');
        p.extend(v.to_le_bytes());
    };
    let mut p = vec![0x80, 2, b'}'];
    text(&mut p, "w");
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    text(&mut p, "storage");
    p.extend(b"ctorch\nFloatStorage\n");
    text(&mut p, "0");
    text(&mut p, "cpu");
    int(&mut p, 4);
    p.extend(b"tQ");
    int(&mut p, 0);
    p.push(b'(');
    size.iter().for_each(|&s| int(&mut p, s));
    p.extend(b"t(");
    stride.iter().for_each(|&s| int(&mut p, s));
    p.extend(b"t\x89ccollections\nOrderedDict\n)RtRs.");
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", stored).unwrap();
    z.write_all(&p).unwrap();
    z.start_file("archive/data/0", stored).unwrap();
    z.write_all(&[0u8; 16]).unwrap();
    z.finish().unwrap();
}

#[test]
fn a_checkpoint_view_far_larger_than_its_storage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok.pth");
    zip_pth(&ok, [2, 2], [2, 1]);
    assert_eq!(gradcam_encoders::Weights::load(&ok).unwrap().names(), vec!["w".to_string()]);
    let bad = dir.path().join("bad.pth");
    zip_pth(&bad, [1 << 20, 1 << 20], [0, 0]);
    let out = dir.path().join("out.safetensors");
    let (o, rss, took) = run_measured(&["convert", bad.to_str().unwrap(), out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("a view of 1099511627776 elements over a storage of 4"), "{stderr}");
    assert!(rss < 100 << 10 && took < Duration::from_secs(10), "{rss} KiB, {took:?}");
    assert!(!out.exists());
}

/// SIGTERM or SIGINT in the middle of writing files: the temporaries in flight are removed, and
/// the exit status says which signal stopped the run.
#[test]
fn an_interrupted_run_leaves_no_temporary_file() {
    for (signal, status) in [("TERM", 143), ("INT", 130)] {
        for attempt in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("scenes");
            let mut child = Command::new(env!("CARGO_BIN_EXE_gradcam"))
                .args(["scenes", "--n", "100000", "--out", out.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(300 + 70 * attempt));
            assert!(Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap().success());
            let code = child.wait().unwrap().code();
            assert_eq!(code, Some(status), "SIG{signal}");
            let mut left = Vec::new();
            let mut dirs = vec![dir.path().to_path_buf()];
            while let Some(d) = dirs.pop() {
                for e in std::fs::read_dir(&d).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        dirs.push(p);
                    } else if p.to_string_lossy().ends_with(".tmp") {
                        left.push(p);
                    }
                }
            }
            assert!(left.is_empty(), "SIG{signal} left {left:?}");
        }
    }
}

/// Pickles nested a million levels deep (list, dict, call) in a `.pth`: a clear error, not a
/// stack overflow (the reader of real checkpoints is tested by the goldens and tests/fixtures).
#[test]
fn deeply_nested_pickles_are_refused_without_overflowing_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = |body: Vec<u8>| -> Vec<u8> {
        // A legacy torch.save stream starts with its magic number; nesting is refused before.
        let mut p = vec![0x80, 2];
        p.extend(body);
        p.push(b'.');
        p
    };
    let n = 1_000_000;
    let lists = legacy([b"]".repeat(n), b"a".repeat(n - 1)].concat());
    let dicts = legacy([b"}K\x01".repeat(n), b"}".to_vec(), b"s".repeat(n)].concat());
    let tuples = legacy([b"(".repeat(n), b")".to_vec(), b"t".repeat(n)].concat());
    let calls = legacy([b"cbuiltins\nf\n)".repeat(n), b"R".repeat(n - 1)].concat());
    for (what, bytes) in [("lists", lists), ("dicts", dicts), ("tuples", tuples), ("calls", calls)] {
        let path = dir.path().join(format!("{what}.pth"));
        std::fs::write(&path, bytes).unwrap();
        let out = dir.path().join("out.safetensors");
        fails_with(&["convert", path.to_str().unwrap(), out.to_str().unwrap()], "nested more than 1000 levels");
    }
}

#[test]
fn errors_name_the_reason_not_candle_internals() {
    let dir = tempfile::tempdir().unwrap();
    // dissect --out under a file: the reason, beside the path.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    fails_with(&["dissect", "--data", "data/shapescenes/test", "--limit", "2", "--out", file.join("d.json").to_str().unwrap()], "Not a directory");
    // Training on a split without captions: said so, not "empty tensor for reduce".
    let data = dir.path().join("data");
    for split in ["train", "val"] {
        split_copy(&data.join(split));
    }
    let captions = data.join("train/captions.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&captions).unwrap()).unwrap();
    c["annotations"] = serde_json::json!([]);
    std::fs::write(&captions, c.to_string()).unwrap();
    fails_with(&["train", "captioner", "--data", data.to_str().unwrap(), "--out", dir.path().join("m").to_str().unwrap(), "--epochs", "1"], "has no captions to train on");
}

/// Found by fuzz/fuzz_targets/tokenizer.rs: a JSON syntax error inside "decoder" made the
/// tokenizers crate panic ("Helper: Error(expected value)") instead of returning an error.
#[test]
fn fuzz_regression_a_tokenizer_with_broken_json_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    model_copy("captioner", dir.path());
    let path = dir.path().join("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"decoder\":null", "\"decoder\":oull");
    assert!(text.contains("oull"), "the shipped tokenizer has a null decoder");
    std::fs::write(&path, text).unwrap();
    fails_with(&["caption", "data/shapescenes/test/images/000018.png", "--model", dir.path().to_str().unwrap(), "--out", dir.path().to_str().unwrap()], "not valid JSON");
}

/// Found by fuzz/fuzz_targets/coco.rs: an instances file declaring a 51222222 x 512 image made
/// each of its annotations allocate a 26 GB mask (an abort).
#[test]
fn fuzz_regression_an_annotation_file_declaring_a_giant_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    split_copy(dir.path());
    let path = dir.path().join("instances.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["images"][0]["width"] = serde_json::json!(51222222u64);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    let (o, rss, _) = run_measured(&["caption", "--eval", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(matches!(o.status.code(), Some(1 | 2)) && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("51222222x64 is larger than any image gradcam decodes"), "{stderr}");
    assert!(rss < 200_000, "{rss} KiB");
}

/// A scene count from a typo is a clear error before anything is written (it used to write 4 GB a
/// minute and abort at 7.7 GB).
#[test]
fn a_huge_scene_count_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scenes");
    let o = gradcam(&["scenes", "--out", out.to_str().unwrap(), "--n", "18446744073709551615"]);
    assert!(crate::err(&o).contains("a dataset holds at most 3000000"), "{}", crate::err(&o));
    assert!(!out.exists(), "nothing written");
    let o = gradcam(&["demo", "bias", "--out", out.to_str().unwrap(), "--scenes", "18446744073709551615"]);
    assert!(crate::err(&o).contains("give 10 to 3000000"), "{}", crate::err(&o));
}

/// The server's flags at their extremes are refused at start with their range (a worker used to
/// panic on `--timeout 2^64-1`; `--max-upload-mb 2^44` became a limit of 0 bytes).
#[test]
fn serve_flags_outside_their_ranges_are_refused_at_start() {
    for (flag, value, message) in [
        ("--timeout", "18446744073709551615", "--timeout 18446744073709551615: give 1 to 86400"),
        ("--max-upload-mb", "17592186044416", "--max-upload-mb 17592186044416: give 1 to 4096"),
        ("--queue", "18446744073709551615", "--queue 18446744073709551615: give 0 to 100000"),
        ("--workers", "0", "--workers 0: give 1 to 256"),
    ] {
        let o = gradcam(&["serve", "--port", "0", "--classifier", "none", "--caption-model", "none", "--vqa-model", "none", "--clip-model", "none", flag, value]);
        assert!(crate::err(&o).contains(message), "{flag}: {}", crate::err(&o));
    }
}
