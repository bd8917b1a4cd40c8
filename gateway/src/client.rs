//! A client of the gateway's socket: the `keyhole` CLI uses it, and so can any Rust program.

use std::path::Path;
use std::time::Duration;

use keyhole_protocol::{DEFAULT_MAX_FRAME, Encoding, HANDSHAKE_MAJOR, HANDSHAKE_MAX_FRAME, decode};
use keyhole_transport::{BoxRead, BoxWrite, FrameReader, FrameWriter, socket};

use crate::api::{
    API_MAJOR, ApiError, ApiOp, ApiReply, ApiRequest, ApiResponse, ApiResult, ClientHello,
    ServerHello,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The gateway answered with an error.
    #[error("{0}")]
    Api(ApiError),
    /// The gateway could not be reached or broke the connection.
    #[error("{0}")]
    Transport(String),
}

/// A connection to the gateway.
pub struct GatewayClient {
    reader: FrameReader<BoxRead>,
    writer: FrameWriter<BoxWrite>,
    next_id: u64,
}

impl GatewayClient {
    /// Connects to the socket and authenticates with the token in `token_file`.
    pub async fn connect(
        socket_path: &Path,
        token_file: &Path,
        deadline: Duration,
    ) -> Result<GatewayClient, ClientError> {
        let t = |e: String| ClientError::Transport(e);
        let token = keyhole_transport::read_token_file(token_file)
            .map_err(|e| t(format!("{e}; is `keyhole serve` running?")))?;
        let stream = tokio::time::timeout(deadline, socket::connect(socket_path))
            .await
            .map_err(|_| t(format!("connecting to {} timed out", socket_path.display())))?
            .map_err(|e| {
                t(format!(
                    "cannot reach the gateway at {}: {e}; is `keyhole serve` running?",
                    socket_path.display()
                ))
            })?;
        let (read, write) = socket::into_halves(stream);
        let mut reader = FrameReader::new(read, HANDSHAKE_MAX_FRAME);
        let mut writer =
            FrameWriter::new(write, HANDSHAKE_MAJOR, Encoding::Json, HANDSHAKE_MAX_FRAME);
        writer
            .queue(&ClientHello {
                token,
                majors: vec![API_MAJOR],
            })
            .map_err(|e| t(e.to_string()))?;
        let started = tokio::time::Instant::now();
        writer
            .flush_within(deadline)
            .await
            .map_err(|e| t(format!("cannot talk to the gateway: {e}")))?;
        let left = deadline.saturating_sub(started.elapsed());
        let reply = tokio::time::timeout(left, reader.next())
            .await
            .map_err(|_| t("the gateway did not answer the hello in time".into()))?
            .map_err(|e| t(format!("the gateway broke the connection: {e}")))?
            .ok_or_else(|| t("the gateway closed the connection".into()))?;
        match decode::<ServerHello>(Encoding::Json, reply.payload)
            .map_err(|e| t(format!("bad hello from the gateway: {e}")))?
        {
            ServerHello::Welcome { .. } => {}
            ServerHello::Refused { message } => {
                return Err(t(format!("the gateway refused this client: {message}")));
            }
        }
        reader.set_cap(DEFAULT_MAX_FRAME);
        writer.set_format(API_MAJOR, Encoding::Json, DEFAULT_MAX_FRAME);
        Ok(GatewayClient {
            reader,
            writer,
            next_id: 1,
        })
    }

    /// Sends one request and waits for its answer.
    pub async fn call(&mut self, op: ApiOp, deadline: Duration) -> Result<ApiReply, ClientError> {
        let t = |e: String| ClientError::Transport(e);
        let id = self.next_id;
        self.next_id += 1;
        self.writer
            .queue(&ApiRequest { id, op })
            .map_err(|e| t(format!("request not sent: {e}")))?;
        let started = tokio::time::Instant::now();
        self.writer
            .flush_within(deadline)
            .await
            .map_err(|e| t(format!("the gateway connection broke: {e}")))?;
        let left = deadline.saturating_sub(started.elapsed());
        let frame = tokio::time::timeout(left, self.reader.next())
            .await
            .map_err(|_| t(format!("the gateway did not answer within {deadline:?}")))?
            .map_err(|e| t(format!("the gateway broke the connection: {e}")))?
            .ok_or_else(|| t("the gateway closed the connection".into()))?;
        let response: ApiResponse = decode(Encoding::Json, frame.payload)
            .map_err(|e| t(format!("bad answer from the gateway: {e}")))?;
        if response.id != id {
            return Err(t(format!(
                "the gateway answered request {} instead of {id}",
                response.id
            )));
        }
        match response.result {
            ApiResult::Ok(reply) => Ok(reply),
            ApiResult::Err(e) => Err(ClientError::Api(e)),
        }
    }
}
