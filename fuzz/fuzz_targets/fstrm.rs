//! A Frame Streams stream as a dnstap producer might send it to the consumer: arbitrary bytes
//! decoded frame by frame (`fstrm::decode`) under a data frame limit taken from the first
//! byte, then through the `tokio_util` codec to its end (`decode_eof`), and each data frame
//! through the dnstap protobuf decoder.
//!
//! Properties: nothing panics; a decoded frame never claims more bytes than it was given;
//! no data frame exceeds the limit; a decoded frame encodes back to exactly the bytes it was
//! decoded from (the wire form is canonical); the codec agrees with `decode`.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_dnstap::fstrm::{self, Frame, FstrmCodec};
use tokio_util::codec::Decoder as _;

fuzz_target!(|data: &[u8]| {
    let Some((&limit, stream)) = data.split_first() else {
        return;
    };
    let max_frame = usize::from(limit) * 16;
    let mut at = 0;
    let mut frames = Vec::new();
    while at < stream.len() {
        match fstrm::decode(&stream[at..], max_frame) {
            Ok(Some((frame, used))) => {
                assert!(used > 0 && at + used <= stream.len());
                if let Frame::Data(d) = &frame {
                    assert!(d.len() <= max_frame && !d.is_empty());
                    let _ = portcullis_dnstap::message::decode(d);
                }
                let mut again = BytesMut::new();
                fstrm::encode(&frame, &mut again);
                assert_eq!(&again[..], &stream[at..at + used], "{frame:?}");
                frames.push(frame);
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let mut codec = FstrmCodec { max_frame };
    let mut buf = BytesMut::from(stream);
    let mut via_codec = Vec::new();
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => via_codec.push(f),
            Ok(None) | Err(_) => break,
        }
    }
    assert_eq!(frames, via_codec);
});
