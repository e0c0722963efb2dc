//! The presence API (`presence.v1`), generated at build time from the `.proto`
//! files beside this crate: message types, server traits and client stubs.

pub mod v1 {
    tonic::include_proto!("presence.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("presence_descriptor");

/// The codec of every generated server and client: prost with small buffers.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// Initial encode and decode buffer of each call, in bytes. tonic
    /// allocates its buffers per call and direction up front (8 KiB each by
    /// default) and grows them as needed; presence messages are a few dozen
    /// bytes, and a node holds 100k heartbeat streams, so the default costs
    /// ~7.8 KB of memory per session (measured).
    pub const BUFFER_SIZE: usize = 256;
    /// How much a stream batches into one write: tonic's default.
    pub const YIELD_THRESHOLD: usize = 32 * 1024;

    /// `tonic_prost::ProstCodec` with [`BUFFER_SIZE`] buffers.
    #[derive(Debug)]
    pub struct CompactCodec<T, U>(PhantomData<fn(T) -> U>);

    impl<T, U> Default for CompactCodec<T, U> {
        fn default() -> Self {
            CompactCodec(PhantomData)
        }
    }

    impl<T, U> Codec for CompactCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
        }
    }
}
