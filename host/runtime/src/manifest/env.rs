//! `${NAME}` and `${NAME:-default}` in a manifest's paths and properties.

/// Expands `${NAME}` and `${NAME:-default}` in a path or a Kafka property from the manifest, so
/// one manifest works wherever the build puts the components
/// (`${SWITCHYARD_COMPONENTS:-../target/...}`) and secrets come from the environment.
pub fn expand_env(text: &str) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(ExpandError::Unclosed {
                text: text.to_string(),
            });
        };
        let inner = &rest[start + 2..start + end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        match (std::env::var(name), default) {
            (Ok(value), _) if !value.is_empty() => out.push_str(&value),
            (_, Some(default)) => out.push_str(default),
            _ => {
                return Err(ExpandError::Unset {
                    text: text.to_string(),
                    name: name.to_string(),
                });
            }
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Why [`expand_env`] could not expand a text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    /// A `${` without its `}`.
    #[error("unclosed ${{ in {text:?}")]
    Unclosed {
        /// The text.
        text: String,
    },
    /// A variable that is not set (or empty), without a default.
    #[error(
        "{text:?} uses ${{{name}}}, which is not set: set it or give a default with \
         ${{{name}:-DEFAULT}}"
    )]
    Unset {
        /// The text.
        text: String,
        /// The variable.
        name: String,
    },
}
