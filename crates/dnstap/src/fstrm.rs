//! The Frame Streams wire format (the transport of dnstap), as a pure codec: data frames,
//! control frames (READY, ACCEPT, START, STOP, FINISH) with their content-type fields, a
//! limit on the size of a data frame, and a precise error for every malformed input.
//!
//! A data frame is a 32-bit big-endian length (not zero) and that many bytes. A control frame
//! is an escape (a zero length), a 32-bit control length, then a 32-bit control type and its
//! fields (32-bit type, 32-bit length, payload; type 1 is CONTENT_TYPE). [`decode`] works on a
//! byte slice and never panics, whatever the input (it is fuzzed); [`FstrmCodec`] wraps it for
//! `tokio_util::codec::Framed`.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// The content type of dnstap payloads.
pub const CONTENT_TYPE_DNSTAP: &[u8] = b"protobuf:dnstap.Dnstap";
/// Largest control frame accepted, as in libfstrm (`FSTRM_CONTROL_FRAME_LENGTH_MAX`).
pub const MAX_CONTROL_LEN: usize = 512;
/// Largest content type accepted, as in libfstrm.
pub const MAX_CONTENT_TYPE_LEN: usize = 256;
/// Default limit on a data frame: a DNS message is at most 64 KiB, a dnstap message holds a
/// query and a response, plus addresses and identity.
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024;

const FIELD_CONTENT_TYPE: u32 = 1;

/// The control frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlType {
    Accept,
    Start,
    Stop,
    Ready,
    Finish,
}

impl ControlType {
    pub fn code(self) -> u32 {
        match self {
            ControlType::Accept => 1,
            ControlType::Start => 2,
            ControlType::Stop => 3,
            ControlType::Ready => 4,
            ControlType::Finish => 5,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => ControlType::Accept,
            2 => ControlType::Start,
            3 => ControlType::Stop,
            4 => ControlType::Ready,
            5 => ControlType::Finish,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ControlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ControlType::Accept => "ACCEPT",
            ControlType::Start => "START",
            ControlType::Stop => "STOP",
            ControlType::Ready => "READY",
            ControlType::Finish => "FINISH",
        })
    }
}

/// A control frame and its content types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub kind: ControlType,
    pub content_types: Vec<Bytes>,
}

impl Control {
    /// A control frame carrying the dnstap content type (READY, ACCEPT, START).
    pub fn dnstap(kind: ControlType) -> Self {
        Control {
            kind,
            content_types: vec![Bytes::from_static(CONTENT_TYPE_DNSTAP)],
        }
    }

    /// A control frame without fields (STOP, FINISH).
    pub fn bare(kind: ControlType) -> Self {
        Control {
            kind,
            content_types: Vec::new(),
        }
    }

    /// Whether it names the dnstap content type (or none, which means "any").
    pub fn offers_dnstap(&self) -> bool {
        self.content_types.is_empty()
            || self
                .content_types
                .iter()
                .any(|c| c.as_ref() == CONTENT_TYPE_DNSTAP)
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data(Bytes),
    Control(Control),
}

/// Why input is not a valid Frame Streams stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FstrmError {
    #[error("data frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("control frame of {len} bytes exceeds the limit of {MAX_CONTROL_LEN} bytes")]
    ControlOversized { len: usize },
    #[error("control frame of {len} bytes is shorter than its 4-byte type")]
    ControlTooShort { len: usize },
    #[error("unknown control frame type {0:#x}")]
    UnknownControl(u32),
    #[error("{kind} control frame: field header truncated at byte {at} of {len}")]
    FieldTruncated {
        kind: ControlType,
        at: usize,
        len: usize,
    },
    #[error("{kind} control frame: field of {field_len} bytes overruns the frame ({left} left)")]
    FieldOverrun {
        kind: ControlType,
        field_len: usize,
        left: usize,
    },
    #[error("{kind} control frame: unknown field type {field:#x}")]
    UnknownField { kind: ControlType, field: u32 },
    #[error("{kind} control frame: content type of {len} bytes exceeds {MAX_CONTENT_TYPE_LEN}")]
    ContentTypeTooLong { kind: ControlType, len: usize },
    #[error("{kind} control frame may not carry {count} content types")]
    TooManyContentTypes { kind: ControlType, count: usize },
    #[error("stream truncated: {have} bytes left over, an incomplete frame of {need} bytes")]
    Truncated { have: usize, need: usize },
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes the frame at the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// frame and how many bytes it took. Data frames longer than `max_frame` are refused without
/// waiting for their bytes.
pub fn decode(buf: &[u8], max_frame: usize) -> Result<Option<(Frame, usize)>, FstrmError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = be32(buf) as usize;
    if len != 0 {
        if len > max_frame {
            return Err(FstrmError::Oversized {
                len,
                max: max_frame,
            });
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        return Ok(Some((
            Frame::Data(Bytes::copy_from_slice(&buf[4..4 + len])),
            4 + len,
        )));
    }
    if buf.len() < 8 {
        return Ok(None);
    }
    let clen = be32(&buf[4..]) as usize;
    if clen > MAX_CONTROL_LEN {
        return Err(FstrmError::ControlOversized { len: clen });
    }
    if clen < 4 {
        return Err(FstrmError::ControlTooShort { len: clen });
    }
    if buf.len() < 8 + clen {
        return Ok(None);
    }
    let control = decode_control(&buf[8..8 + clen])?;
    Ok(Some((Frame::Control(control), 8 + clen)))
}

/// Decodes a control frame's body (type and fields).
pub fn decode_control(body: &[u8]) -> Result<Control, FstrmError> {
    if body.len() < 4 {
        return Err(FstrmError::ControlTooShort { len: body.len() });
    }
    let code = be32(body);
    let kind = ControlType::from_code(code).ok_or(FstrmError::UnknownControl(code))?;
    let mut content_types = Vec::new();
    let mut at = 4;
    while at < body.len() {
        if body.len() - at < 8 {
            return Err(FstrmError::FieldTruncated {
                kind,
                at,
                len: body.len(),
            });
        }
        let field = be32(&body[at..]);
        let field_len = be32(&body[at + 4..]) as usize;
        at += 8;
        let left = body.len() - at;
        if field_len > left {
            return Err(FstrmError::FieldOverrun {
                kind,
                field_len,
                left,
            });
        }
        if field != FIELD_CONTENT_TYPE {
            return Err(FstrmError::UnknownField { kind, field });
        }
        if field_len > MAX_CONTENT_TYPE_LEN {
            return Err(FstrmError::ContentTypeTooLong {
                kind,
                len: field_len,
            });
        }
        content_types.push(Bytes::copy_from_slice(&body[at..at + field_len]));
        at += field_len;
    }
    // READY and ACCEPT list types; START names at most one; STOP and FINISH name none.
    let most = match kind {
        ControlType::Ready | ControlType::Accept => usize::MAX,
        ControlType::Start => 1,
        ControlType::Stop | ControlType::Finish => 0,
    };
    if content_types.len() > most {
        return Err(FstrmError::TooManyContentTypes {
            kind,
            count: content_types.len(),
        });
    }
    Ok(Control {
        kind,
        content_types,
    })
}

/// Appends `frame` to `out` in wire form.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Data(payload) => {
            out.reserve(4 + payload.len());
            // Payloads come from our own encoder, far below 4 GiB; a longer one is cut off
            // rather than written with a wrapped length.
            let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
            out.put_u32(len);
            out.put_slice(&payload[..len as usize]);
        }
        Frame::Control(c) => {
            let fields: usize = c.content_types.iter().map(|t| 8 + t.len()).sum();
            let clen = 4 + fields;
            out.reserve(8 + clen);
            out.put_u32(0);
            out.put_u32(u32::try_from(clen).unwrap_or(u32::MAX));
            out.put_u32(c.kind.code());
            for t in &c.content_types {
                out.put_u32(FIELD_CONTENT_TYPE);
                out.put_u32(u32::try_from(t.len()).unwrap_or(u32::MAX));
                out.put_slice(t);
            }
        }
    }
}

/// The codec for `tokio_util::codec::Framed`, with a data frame limit.
#[derive(Debug, Clone)]
pub struct FstrmCodec {
    pub max_frame: usize,
}

impl Default for FstrmCodec {
    fn default() -> Self {
        FstrmCodec {
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// A codec error: the stream's bytes, or the transport under it.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Fstrm(#[from] FstrmError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl tokio_util::codec::Decoder for FstrmCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match decode(src, self.max_frame)? {
            Some((frame, used)) => {
                src.advance(used);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FstrmError::Truncated {
                have: src.len(),
                need: needed(src),
            }
            .into()),
        }
    }
}

/// How long the incomplete frame at the start of `buf` says it is (for the error message).
fn needed(buf: &[u8]) -> usize {
    match buf.len() {
        0..4 => 4,
        _ if be32(buf) != 0 => 4 + be32(buf) as usize,
        4..8 => 8,
        _ => 8 + be32(&buf[4..]) as usize,
    }
}

impl tokio_util::codec::Encoder<Frame> for FstrmCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode(&frame, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn wire(f: &Frame) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode(f, &mut b);
        b.to_vec()
    }

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::Data(Bytes::from_static(b"hello")),
            Frame::Control(Control::dnstap(ControlType::Ready)),
            Frame::Control(Control::dnstap(ControlType::Start)),
            Frame::Control(Control::bare(ControlType::Stop)),
            Frame::Control(Control::bare(ControlType::Finish)),
        ] {
            let w = wire(&f);
            assert_eq!(decode(&w, 100).unwrap(), Some((f.clone(), w.len())));
            // Every proper prefix asks for more bytes.
            for cut in 0..w.len() {
                assert_eq!(decode(&w[..cut], 100).unwrap(), None, "{f:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn the_ready_frame_is_what_libfstrm_sends() {
        let w = wire(&Frame::Control(Control::dnstap(ControlType::Ready)));
        let mut want = vec![0, 0, 0, 0, 0, 0, 0, 34, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, 22];
        want.extend_from_slice(CONTENT_TYPE_DNSTAP);
        assert_eq!(w, want);
    }

    #[test]
    fn bad_input_gets_a_precise_error() {
        assert_eq!(
            decode(&[0, 0, 1, 0], 100),
            Err(FstrmError::Oversized { len: 256, max: 100 })
        );
        assert_eq!(
            decode(&[0, 0, 0, 0, 0, 0, 2, 1], 100),
            Err(FstrmError::ControlOversized { len: 513 })
        );
        assert_eq!(
            decode(&[0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 9], 100),
            Err(FstrmError::UnknownControl(9))
        );
        assert!(matches!(
            decode(&[0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 4, 0, 0, 0, 1], 100),
            Err(FstrmError::FieldTruncated { .. })
        ));
        assert!(matches!(
            decode(
                &[0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, 9],
                100
            ),
            Err(FstrmError::FieldOverrun { .. })
        ));
        let mut stop_with_type = BytesMut::new();
        encode(
            &Frame::Control(Control {
                kind: ControlType::Stop,
                content_types: vec![Bytes::from_static(b"x")],
            }),
            &mut stop_with_type,
        );
        assert!(matches!(
            decode(&stop_with_type, 100),
            Err(FstrmError::TooManyContentTypes { .. })
        ));
    }

    #[test]
    fn a_stream_cut_mid_frame_is_truncated_at_eof() {
        use tokio_util::codec::Decoder as _;
        let mut c = FstrmCodec::default();
        let mut b = BytesMut::from(&[0u8, 0, 0, 10, 1, 2, 3][..]);
        assert!(c.decode(&mut b).unwrap().is_none());
        let e = c.decode_eof(&mut b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream truncated: 7 bytes left over, an incomplete frame of 14 bytes"
        );
    }
}
