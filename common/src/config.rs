//! Loading TOML config files into typed structs with `deny_unknown_fields`.
//! Errors are one line naming the file, the line and the offending key, so that
//! a binary can print them and exit 64.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl ConfigError {
    /// A semantic error found by `validate()` after parsing.
    pub fn invalid(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { origin: origin.into(), message: message.into() }
    }
}

/// Reads and parses `path`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_toml(path, &text)
}

/// Parses `text` as if read from `path`.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1).unwrap_or(1);
        // toml's Display spans several lines with a source excerpt; keep one line.
        let message = e.message().replace('\n', " ").trim().to_owned();
        ConfigError::Parse { path: path.to_owned(), line, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: String,
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let err =
            parse_toml::<Sample>(Path::new("/etc/x.toml"), "listen = \"a\"\nlisen = 1\n").unwrap_err().to_string();
        assert!(err.starts_with("/etc/x.toml:2: unknown field `lisen`"), "{err}");
        assert!(!err.contains('\n'));
    }
}
