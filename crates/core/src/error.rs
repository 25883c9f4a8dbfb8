use std::path::PathBuf;

/// Errors of the shared layer. `Data` is bad user input (a file, row or column to fix); the
/// others are environment failures.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Parquet { path: PathBuf, source: parquet::errors::ParquetError },
    #[error("{}: {source}", path.display())]
    Arrow { path: PathBuf, source: arrow_schema::ArrowError },
    /// Bad input data; `location` names the file and, where known, the row or line.
    #[error("{location}: {message}")]
    Data { location: String, message: String },
    /// A broken invariant inside rbon (a bug, or files changed under a run).
    #[error("internal error: {0}")]
    Internal(String),
    /// The run directory is in a state this command cannot work with.
    #[error("{}: {message}", path.display())]
    RunDir { path: PathBuf, message: String },
}

impl CoreError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
    pub fn data(location: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Data { location: location.into(), message: message.into() }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into())
    }
    /// True when the user's input, not the environment, is at fault.
    pub fn is_data(&self) -> bool {
        matches!(self, Self::Data { .. })
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
