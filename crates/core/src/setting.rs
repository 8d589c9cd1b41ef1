//! [`SettingError`]: a value a library call does not take, naming the setting as the library
//! knows it (a field of its options, an argument), so that a front end can name it its own way
//! (the CLI names the flag).

/// The settings a [`SettingError`] is about, by their library names.
pub type Settings = Vec<&'static str>;

/// A value of a setting that a call does not take: which setting(s), the value given (where the
/// message shows it), what is required, and the error behind it, if any.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render(&|s| s.to_string()))]
pub struct SettingError {
    /// The settings concerned, by their library names (`eps`, `input_size`, `out`).
    pub settings: Settings,
    /// The value given, when the message shows it.
    pub value: Option<String>,
    /// What is required, or what is wrong, in words (after the names, or after `name value:`).
    pub requirement: String,
    /// The error that made the value unusable, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SettingError {
    /// `setting value: requirement`.
    pub fn value(setting: &'static str, value: impl std::fmt::Display, requirement: impl Into<String>) -> Self {
        SettingError { settings: vec![setting], value: Some(value.to_string()), requirement: requirement.into(), source: None }
    }

    /// `settings requirement` (several names are joined as `a, b and c`).
    pub fn new(settings: Settings, requirement: impl Into<String>) -> Self {
        SettingError { settings, value: None, requirement: requirement.into(), source: None }
    }

    /// With the error that made the value unusable.
    pub fn because(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The message with each setting named by `name` (the library's names by default; a CLI
    /// passes its flags).
    pub fn render(&self, name: &dyn Fn(&str) -> String) -> String {
        let names: Vec<String> = self.settings.iter().map(|s| name(s)).collect();
        let names = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => names.concat(),
        };
        match &self.value {
            Some(v) => format!("{names} {v}: {}", self.requirement),
            None => format!("{names} {}", self.requirement),
        }
    }
}

/// An error and its causes as one line, `error: cause: cause`, as a front end prints it: each shown
/// by `show` (a setting under the front end's name for it, say) or by its own text, and each
/// thing once: a cause whose text ends the part before it is left out (an error whose message
/// repeats its source's, a context naming the file its error names), and a cause whose text
/// begins with the part before it and `: ` stands in its place.
pub fn chain_message(err: &(dyn std::error::Error + 'static), show: &dyn Fn(&(dyn std::error::Error + 'static)) -> Option<String>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = show(e).unwrap_or_else(|| e.to_string());
        let (repeats, extends) = parts.last().map_or((false, false), |before| (before.ends_with(&text), text.strip_prefix(before.as_str()).is_some_and(|rest| rest.starts_with(": "))));
        if extends {
            parts.pop();
        }
        if !repeats {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::{chain_message, SettingError};

    /// `text`, caused by `source`.
    #[derive(Debug)]
    struct Caused(String, Option<Box<Caused>>);

    impl std::fmt::Display for Caused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Caused {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    fn chain(texts: &[&str]) -> Caused {
        texts.iter().rev().fold(None, |source, t| Some(Caused(t.to_string(), source.map(Box::new)))).unwrap()
    }

    #[test]
    fn a_chain_prints_each_cause_once() {
        let os = "No such file or directory (os error 2)";
        let plain = |e: &Caused| chain_message(e, &|_| None);
        assert_eq!(plain(&chain(&["/x.png", "/x.png", os])), format!("/x.png: {os}"));
        assert_eq!(plain(&chain(&["/d/c.json", &format!("/d/c.json: {os}"), os])), format!("/d/c.json: {os}"));
        assert_eq!(plain(&chain(&["loading /m.onnx", "/m.onnx", os])), format!("loading /m.onnx: {os}"));
        assert_eq!(plain(&chain(&["training", "cannot write /m/a.json", os])), format!("training: cannot write /m/a.json: {os}"));
        let shown = chain_message(&chain(&["a", "b"]), &|e| (e.to_string() == "b").then(|| "--b".to_string()));
        assert_eq!(shown, "a: --b");
    }

    #[test]
    fn names_the_settings_its_callers_way() {
        let e = SettingError::value("input_size", "\"0\"", "give HxW");
        assert_eq!(e.to_string(), "input_size \"0\": give HxW");
        assert_eq!(e.render(&|s| format!("--{}", s.replace('_', "-"))), "--input-size \"0\": give HxW");
        let e = SettingError::new(vec!["labels", "mean", "std"], "are for ONNX models");
        assert_eq!(e.to_string(), "labels, mean and std are for ONNX models");
        assert_eq!(SettingError::new(vec!["steps"], "must be at least 1").to_string(), "steps must be at least 1");
    }
}
