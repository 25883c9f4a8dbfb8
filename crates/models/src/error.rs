use std::path::PathBuf;

/// Errors loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model could not be found; `looked` lists where.
    #[error("model `{spec}` not found; looked in: {looked}")]
    NotFound { spec: String, looked: String },
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error("chat template of {path}: {message}")]
    Template { path: String, message: String },
    #[error("{context}: {source}")]
    Candle { context: String, source: candle_core::Error },
}

impl ModelError {
    pub(crate) fn candle(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Self {
        let context = context.into();
        move |source| Self::Candle { context, source }
    }
}
