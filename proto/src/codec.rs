//! The gRPC codec of the snapshot protocol: prost's, with buffers sized for
//! the protocol's messages.
//!
//! tonic encodes a stream's messages into one buffer per stream, which it
//! keeps for the life of the stream at the largest size it ever grew to
//! (likewise the decoder). With tonic's defaults (8 KiB to start, several
//! messages encoded before yielding up to 32 KiB) an agent stream that had
//! taken a full state held about 60 KB of encode buffers for good: the
//! largest item of the control plane's heap per connected agent (heaptrack,
//! 1,000 streams, 1 Dec 2026). Messages here are at most [`PART_BYTES`] of
//! resources, each encoded and handed to HTTP/2 on its own, so no buffer
//! grows past [`BUFFER_BYTES`].

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Resource (or announced name) bytes per message part, for updates and
/// Hellos alike (protocol rules 7 and 9): with the message's own fields it
/// stays inside one [`BUFFER_BYTES`] buffer.
pub const PART_BYTES: usize = 6 * 1024;

/// What each stream's encode and decode buffers start at, and stay at.
pub const BUFFER_BYTES: usize = 8 * 1024;

/// prost's codec with [`BUFFER_BYTES`] buffers, yielding every message as
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
fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, 1)
}

impl<T, U> Codec for PartCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
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
