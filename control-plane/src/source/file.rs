//! The `file:PATH` source (placeholder until the real one lands).
use super::{Source, SourceState};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
/// Placeholder.
#[derive(Debug)]
pub struct FileSource {
    paths: Vec<PathBuf>,
}
impl FileSource {
    /// Placeholder.
    pub fn new(paths: Vec<PathBuf>, _cluster: String, _debounce: Duration) -> Self {
        Self { paths }
    }
}
impl Source for FileSource {
    fn name(&self) -> String {
        format!("file:{}", self.paths[0].display())
    }
    fn run(
        self: Box<Self>,
        state: watch::Sender<SourceState>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            state.send_replace(SourceState {
                synced: true,
                ..Default::default()
            });
            shutdown.cancelled().await;
        })
    }
}
