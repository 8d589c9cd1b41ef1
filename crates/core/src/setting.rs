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

#[cfg(test)]
mod tests {
    use super::SettingError;

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
