//! `--inputs PATH`: the list a dataset run explains, streamed. A folder (read recursively, each
//! folder's entries sorted by name, hidden ones skipped, image files by their extension), a text
//! file (one image path per line; blank lines and `#` comments skipped), a COCO instances (or
//! captions) JSON file (its `images`, under the `images/` folder beside it) or a VQA v2 questions
//! file (its questions, each with its image from that folder). An input's index is its position
//! in that list, the same on every machine that sees the same files.

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One input of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// Its position in the full list.
    pub index: usize,
    /// The image.
    pub image: PathBuf,
    /// For a VQA questions file: the question about the image.
    pub question: Option<Question>,
    /// Why the input cannot be explained, known from the list alone (a question whose image is
    /// not in the folder): recorded as the input's error.
    pub problem: Option<String>,
}

/// A question of a VQA questions file.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub id: u64,
    pub text: String,
}

/// The extensions of the images a folder's walk takes (any case).
pub const IMAGE_EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tif", "tiff"];

/// What kind of list a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Folder,
    Text,
    Coco,
    Questions,
}

/// A list of inputs: opened again for each pass (one to count, one to run), so that a long text
/// file or a deep folder is never held in memory whole.
#[derive(Debug, Clone)]
pub struct Inputs {
    path: PathBuf,
    kind: Kind,
}

impl Inputs {
    /// The list at `path`, told apart by what it is: a folder, a `.json` file with `questions`
    /// (VQA) or `images` (COCO), or any other file (one path per line).
    pub fn open(path: &Path) -> Result<Inputs> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Inputs { path: path.to_path_buf(), message: "cannot read it".into(), source: Some(source) })?;
        let kind = if meta.is_dir() {
            Kind::Folder
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
            json_kind(path)?
        } else {
            Kind::Text
        };
        Ok(Inputs { path: path.to_path_buf(), kind })
    }

    /// What kind of list it is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The list's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The inputs, in order, with their indices. A list that cannot be read (a folder inside the
    /// walk, a line of the file) is an `Err`: the indices after it would be guesses.
    pub fn iter(&self) -> Result<Box<dyn Iterator<Item = Result<Input>>>> {
        let plain = |(index, image): (usize, Result<PathBuf>)| image.map(|image| Input { index, image, question: None, problem: None });
        Ok(match self.kind {
            Kind::Folder => Box::new(Walk::new(&self.path).enumerate().map(plain)),
            Kind::Text => {
                let file = std::fs::File::open(&self.path).map_err(|e| self.err("cannot open it", e))?;
                let path = self.path.clone();
                let lines = std::io::BufReader::new(file).lines().filter_map(move |line| match line {
                    Ok(l) if l.trim().is_empty() || l.trim_start().starts_with('#') => None,
                    Ok(l) => Some(Ok(PathBuf::from(l.trim()))),
                    Err(e) => Some(Err(Error::Inputs { path: path.clone(), message: "cannot read a line".into(), source: Some(e) })),
                });
                Box::new(lines.enumerate().map(plain))
            }
            Kind::Coco => {
                let dir = self.images_dir();
                let images = gradcam_scenes::coco::image_list(&self.path)?;
                Box::new(images.into_iter().enumerate().map(move |(index, i)| Ok(Input { index, image: dir.join(i.file_name), question: None, problem: None })))
            }
            Kind::Questions => {
                let dir = self.images_dir();
                let files = gradcam_scenes::vqa::images_by_id(&dir)?;
                let file = gradcam_scenes::vqa::Vqa::read(&self.path, None, None)?;
                Box::new(file.questions.into_iter().enumerate().map(move |(index, q)| {
                    let (image, problem) = match files.get(&q.image_id) {
                        Some(image) => (image.clone(), None),
                        None => (dir.clone(), Some(format!("question {}: no image with id {} in {}", q.question_id, q.image_id, dir.display()))),
                    };
                    Ok(Input { index, image, question: Some(Question { id: q.question_id, text: q.question }), problem })
                }))
            }
        })
    }

    /// How many inputs the list holds (a pass over it).
    pub fn count(&self) -> Result<usize> {
        let mut n = 0;
        for input in self.iter()? {
            input?;
            n += 1;
        }
        Ok(n)
    }

    /// The `images/` folder beside a JSON list.
    fn images_dir(&self) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join("images")
    }

    fn err(&self, message: &str, source: std::io::Error) -> Error {
        Error::Inputs { path: self.path.clone(), message: message.into(), source: Some(source) }
    }
}

/// A JSON list's kind, by its top-level keys.
fn json_kind(path: &Path) -> Result<Kind> {
    #[derive(serde::Deserialize)]
    struct Keys {
        questions: Option<serde::de::IgnoredAny>,
        images: Option<serde::de::IgnoredAny>,
    }
    let file = std::fs::File::open(path).map_err(|e| Error::Inputs { path: path.to_path_buf(), message: "cannot open it".into(), source: Some(e) })?;
    let keys: Keys = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|e| Error::Inputs { path: path.to_path_buf(), message: format!("is not a JSON object ({e}); give a folder, a text file of image paths, a COCO instances.json or a VQA questions.json"), source: None })?;
    match (keys.questions, keys.images) {
        (Some(_), _) => Ok(Kind::Questions),
        (None, Some(_)) => Ok(Kind::Coco),
        (None, None) => Err(Error::Inputs { path: path.to_path_buf(), message: "has neither `images` (COCO) nor `questions` (VQA v2)".into(), source: None }),
    }
}

/// A folder's image files, depth first, each folder's entries in byte order of their names:
/// holds one folder's listing per level, never the whole tree. Symbolic links to folders are not
/// followed (no cycles); links to files are taken.
struct Walk {
    /// The entries still to visit, per open folder (innermost last).
    stack: Vec<VecDeque<PathBuf>>,
    /// A folder that could not be listed, reported once.
    error: Option<Error>,
}

impl Walk {
    fn new(root: &Path) -> Walk {
        let mut walk = Walk { stack: Vec::new(), error: None };
        walk.enter(root);
        walk
    }

    fn enter(&mut self, dir: &Path) {
        match std::fs::read_dir(dir).and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect::<std::io::Result<Vec<_>>>()) {
            Ok(mut entries) => {
                entries.retain(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')));
                entries.sort();
                self.stack.push(entries.into());
            }
            Err(source) => self.error = Some(Error::Walk { path: dir.to_path_buf(), source }),
        }
    }
}

impl Iterator for Walk {
    type Item = Result<PathBuf>;

    fn next(&mut self) -> Option<Result<PathBuf>> {
        loop {
            if let Some(e) = self.error.take() {
                return Some(Err(e));
            }
            let top = self.stack.last_mut()?;
            let Some(path) = top.pop_front() else {
                self.stack.pop();
                continue;
            };
            let link = std::fs::symlink_metadata(&path).map(|m| m.file_type().is_symlink()).unwrap_or(false);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() && !link => self.enter(&path),
                Ok(m) if m.is_file() && is_image(&path) => return Some(Ok(path)),
                _ => {}
            }
        }
    }
}

/// Whether a file's extension is an image's.
pub fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_walked_recursively_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b/2.png", "b/10.JPG", "a.png", "c/d/e.webp", "notes.txt", ".hidden/x.png", "b/.y.png"] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(dir.path(), dir.path().join("c/loop")).unwrap();
        let inputs = Inputs::open(dir.path()).unwrap();
        assert_eq!(inputs.kind(), Kind::Folder);
        let names: Vec<String> = inputs.iter().unwrap().map(|i| i.unwrap().image.strip_prefix(dir.path()).unwrap().display().to_string()).collect();
        assert_eq!(names, ["a.png", "b/10.JPG", "b/2.png", "c/d/e.webp"]);
        assert_eq!(inputs.count().unwrap(), 4);
    }

    #[test]
    fn a_text_list_skips_blank_lines_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "# scenes\na.png\n\n  b.png  \nc.png").unwrap();
        let inputs = Inputs::open(&list).unwrap();
        let got: Vec<(usize, PathBuf)> = inputs.iter().unwrap().map(|i| i.unwrap()).map(|i| (i.index, i.image)).collect();
        assert_eq!(got, [(0, "a.png".into()), (1, "b.png".into()), (2, "c.png".into())]);
    }

    #[test]
    fn json_lists_are_told_apart_and_other_json_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("x.json");
        std::fs::write(&bad, r#"{"annotations": []}"#).unwrap();
        let e = Inputs::open(&bad).unwrap_err().to_string();
        assert!(e.contains("neither `images`"), "{e}");
        std::fs::write(&bad, "[1, 2").unwrap();
        assert!(Inputs::open(&bad).unwrap_err().to_string().contains("COCO instances.json"));
        assert!(Inputs::open(&dir.path().join("missing")).unwrap_err().to_string().contains("missing"));
    }
}
