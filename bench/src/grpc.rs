//! The gRPC comparison point: a tonic unary call over a Unix domain socket (HTTP/2, no TLS),
//! carrying a message equivalent to keyhole's Resolve request/response. This is how CSI
//! secrets-store providers, KMS v2 plugins and go-plugin talk to their hosts.
//!
//! The message types and service come from `proto/resolve.proto`, compiled by `build.rs` without
//! protoc (protox + tonic-prost-build).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    dead_code,
    missing_docs,
    unreachable_pub
)]
mod pb {
    tonic::include_proto!("keyhole.bench.v1");
}

use pb::resolver_client::ResolverClient;
use pb::resolver_server::{Resolver, ResolverServer};
use pb::{ResolveRequest, ResolveResponse};

/// How long `measure` keeps retrying the connection while the server process starts up.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// The name every measured call resolves.
const NAME: &str = "bench/grpc";

/// Answers every name with the same fixed value, like keyhole's memory provider would.
struct FixedResolver {
    value: Vec<u8>,
}

#[tonic::async_trait]
impl Resolver for FixedResolver {
    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(ResolveResponse {
            value: self.value.clone(),
            version: request.version.unwrap_or_else(|| "1".to_owned()),
        }))
    }
}

/// Runs a gRPC server on the Unix socket `path` until the process is killed: one unary method
/// Resolve(ResolveRequest{ name: string, version: optional string }) -> ResolveResponse{ value: bytes, version: string },
/// answering every name with a fixed value of `value_len` bytes (like keyhole's memory provider would).
pub fn serve(path: &Path, value_len: usize) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = UnixListener::bind(path)?;
        let service = ResolverServer::new(FixedResolver {
            value: vec![0x5a; value_len],
        });
        Server::builder()
            .serve_with_incoming(service, UnixListenerStream::new(listener))
            .await
            .map_err(io::Error::other)
    })
}

/// A gRPC client of the benchmark's Resolver service.
pub type Client = ResolverClient<Channel>;

/// One unary Resolve call (1 in flight).
pub async fn resolve(client: &mut Client) -> io::Result<ResolveResponse> {
    let request = ResolveRequest {
        name: NAME.to_owned(),
        version: None,
    };
    client
        .resolve(request)
        .await
        .map(Response::into_inner)
        .map_err(io::Error::other)
}

/// Opens an HTTP/2 channel over the Unix socket at `path` (the `http://[::]:50051` URI is a dummy:
/// the connector ignores it), retrying until [`CONNECT_DEADLINE`] while the server starts up.
pub async fn connect(path: &Path) -> io::Result<Client> {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    loop {
        let path: PathBuf = path.to_owned();
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        });
        match Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(connector)
            .await
        {
            Ok(channel) => return Ok(ResolverClient::new(channel)),
            Err(error) if Instant::now() >= deadline => return Err(io::Error::other(error)),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn measures_calls_to_a_served_socket() {
        const VALUE_LEN: usize = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grpc.sock");
        let server_path = path.clone();
        // `serve` never returns on success; the thread ends with the test process.
        std::thread::spawn(move || serve(&server_path, VALUE_LEN));

        let mut client = connect(&path).await.unwrap();
        let reply = resolve(&mut client).await.unwrap();
        assert_eq!(reply.value.len(), VALUE_LEN);
        assert_eq!(reply.version, "1");
    }
}
