//! The gRPC codec of the snapshot protocol: prost's messages, with buffers
//! sized for what each side of a stream really carries.
//!
//! tonic encodes a stream's messages into one buffer per stream, which it
//! keeps for the life of the stream at the largest size it ever grew to
//! (likewise the decoder). With tonic's defaults (8 KiB to start, several
//! messages encoded before yielding up to 32 KiB) an agent stream that had
//! taken a full state held about 60 KB of encode buffers for good: the
//! largest item of the control plane's heap per connected agent (heaptrack,
//! 1,000 streams, 1 Dec 2026). Here every message is encoded and handed to
//! HTTP/2 on its own, and each buffer starts at what its direction needs:
//!
//! ```text
//!                    control plane                     agent
//!  SnapshotUpdate    encode: 1 KiB, grows to the       decode: a part
//!                    largest part sent, never more     (PART_BYTES + 1 KiB)
//!  AgentMessage      decode: 1 KiB (ACKs and Hello     encode: a Hello part
//!                    parts alike)                      (HELLO_PART_BYTES + 1 KiB)
//! ```
//!
//! The control plane's side is what a thousand agents multiply: an agent
//! that reconnects announcing what it holds gets small updates, so its
//! encode buffer stays at 1 KiB; one that takes a full state keeps one part
//! (at most [`PART_BYTES`] of resources and its fields, reserved exactly).
//! An encoder reserves each message's exact size before writing it, so a
//! buffer grows once to the message, not by doubling past it.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::v1;

/// Resource (or removed name) bytes per update part (protocol rule 7). With
/// the message's own fields a part fills one 16 KiB HTTP/2 DATA frame: the
/// control plane writes each frame with one `writev`, and the agent reads
/// it with one `recv`, so a full state costs as few system calls and
/// wake-ups as the frame size allows (a full sync of 10,000 Services is
/// about 200 parts, not 500 of 6 KiB).
pub const PART_BYTES: usize = 15 * 1024;

/// What a buffer that usually carries small messages (the control plane's
/// updates after the first, the agents' ACKs and Hello parts) starts at.
pub const SMALL_BUFFER_BYTES: usize = 1024;

/// gRPC's own header before each message: a compression flag and a length.
pub const GRPC_HEADER_BYTES: usize = 5;

/// The most one Hello part encodes to, as an `AgentMessage` (protocol rule
/// 9): with gRPC's header it fits the control plane's decode buffer as it
/// starts. tonic's decoder keeps a buffer as large as the largest message
/// it decoded for the life of the stream, so with 6 KiB parts every agent
/// that had announced what it holds cost the control plane about 6 KiB
/// more for as long as it stayed (1,000 agents after a reconnect storm,
/// 1 Dec 2026). A single name too long for a part goes alone.
pub const HELLO_PART_BYTES: usize = SMALL_BUFFER_BYTES - GRPC_HEADER_BYTES;

/// Room for a message's own fields beside its [`PART_BYTES`] or
/// [`HELLO_PART_BYTES`] of names and resources.
const FIELDS_BYTES: usize = 1024;

/// The buffers one message type of the protocol needs, per direction.
pub trait PartMessage: Message + Default + Send + 'static {
    /// What a stream's encoder of this type starts with.
    const ENCODE_BUFFER: usize;
    /// What a stream's decoder of this type starts with.
    const DECODE_BUFFER: usize;
}

/// Sent by the control plane, a part at most: the encoder starts small
/// (most updates after the first are one small part) and grows to the
/// largest part; agents decode parts.
impl PartMessage for v1::SnapshotUpdate {
    const ENCODE_BUFFER: usize = SMALL_BUFFER_BYTES;
    const DECODE_BUFFER: usize = PART_BYTES + FIELDS_BYTES;
}

/// Sent by agents: Hello parts, then ACKs and NACKs of a few dozen bytes.
/// The control plane's decoder starts small and grows to a Hello part only
/// for agents that announce what they hold.
impl PartMessage for v1::AgentMessage {
    const ENCODE_BUFFER: usize = HELLO_PART_BYTES + FIELDS_BYTES;
    const DECODE_BUFFER: usize = SMALL_BUFFER_BYTES;
}

/// prost's codec with [`PartMessage`] buffers, yielding every message as
/// soon as it is encoded (the generated clients and servers use it).
#[derive(Debug)]
pub struct PartCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for PartCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// A yield threshold of one byte: each message is its own chunk, so the
/// buffer never holds two.
fn settings(buffer: usize) -> BufferSettings {
    BufferSettings::new(buffer, 1)
}

impl<T, U> Codec for PartCodec<T, U>
where
    T: PartMessage,
    U: PartMessage,
{
    type Encode = T;
    type Decode = U;
    type Encoder = PartEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        PartEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings(U::DECODE_BUFFER))
    }
}

/// prost's encoding, after reserving the message's exact size.
#[derive(Debug)]
pub struct PartEncoder<T>(PhantomData<T>);

impl<T: PartMessage> Encoder for PartEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // Growing to the whole message at once allocates it exactly; left to
        // the writes, the buffer would double past it and keep the slack.
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings(T::ENCODE_BUFFER)
    }
}
