//! gRPC calls with small codec buffers, for the calls a push makes to
//! every host at once: leases (taken, renewed, released), status checks,
//! health polls, activations and the event streams.
//!
//! tonic's default codec sets aside 8 KiB to encode each request and 8 KiB
//! to decode each response. The messages here are a few hundred bytes, but
//! a renewal round or a wave's health gate runs on every host at once: at
//! 1,000 hosts that was over 10 MiB of the CLI's peak memory
//! (BENCHMARKS.md §4b). Buffers still grow to fit a larger message.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, Streaming};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use reload_proto::v1 as pb;

/// Room for any of these messages without growing; the yield threshold is
/// tonic's default.
fn settings() -> BufferSettings {
    BufferSettings::new(1024, 32 * 1024)
}

/// [`ProstCodec`] with [`settings`].
struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

async fn ready(channel: Channel) -> Result<tonic::client::Grpc<Channel>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("Service was not ready: {e}")))?;
    Ok(grpc)
}

/// A unary call to `path` ("/package.Service/Method").
pub async fn unary<T, U>(
    channel: Channel,
    path: &'static str,
    request: T,
) -> Result<Response<U>, Status>
where
    T: prost::Message + Send + Sync + 'static,
    U: prost::Message + Default + Send + Sync + 'static,
{
    ready(channel)
        .await?
        .unary(
            Request::new(request),
            PathAndQuery::from_static(path),
            SmallBufferCodec(PhantomData),
        )
        .await
}

/// A server-streaming call to `path`.
pub async fn server_streaming<T, U>(
    channel: Channel,
    path: &'static str,
    request: T,
) -> Result<Response<Streaming<U>>, Status>
where
    T: prost::Message + Send + Sync + 'static,
    U: prost::Message + Default + Send + Sync + 'static,
{
    ready(channel)
        .await?
        .server_streaming(
            Request::new(request),
            PathAndQuery::from_static(path),
            SmallBufferCodec(PhantomData),
        )
        .await
}

/// GetStatus of `service` (empty: every service), the call a push makes
/// most: staging, the gate's polls, the fence check.
pub async fn get_status(
    channel: Channel,
    service: &str,
) -> Result<Response<pb::GetStatusResponse>, Status> {
    unary(
        channel,
        "/reload.v1.ServiceControl/GetStatus",
        pb::GetStatusRequest {
            service: service.to_string(),
        },
    )
    .await
}

/// GetAgentInfo.
pub async fn get_agent_info(
    channel: Channel,
) -> Result<Response<pb::GetAgentInfoResponse>, Status> {
    unary(
        channel,
        "/reload.v1.AgentService/GetAgentInfo",
        pb::GetAgentInfoRequest {},
    )
    .await
}

/// GetLease.
pub async fn get_lease(channel: Channel) -> Result<Response<pb::GetLeaseResponse>, Status> {
    unary(
        channel,
        "/reload.v1.LeaseService/GetLease",
        pb::GetLeaseRequest {},
    )
    .await
}

/// ReleaseLease: the end of every push, on every host at once.
pub async fn release_lease(
    channel: Channel,
    request: pb::ReleaseLeaseRequest,
) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
    unary(channel, "/reload.v1.LeaseService/ReleaseLease", request).await
}
