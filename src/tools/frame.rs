//! The bench TLV frame: a 1-byte type, a 4-byte big-endian payload length, the payload.
//!
//! `ringfwd bench rr` and `connect` send one frame and wait for it to come back; `ringfwd echo`
//! answers by echoing it. The framing exists so a request/response exchange has a known end
//! without closing the connection, and so a server can refuse absurd lengths: both ends enforce
//! a maximum payload, a header announcing more is rejected *before* anything is allocated or
//! read, and the connection is closed. The type byte is opaque to the echo server; the bench
//! uses [`KIND_DATA`].

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of a frame header: type (1) + big-endian length (4).
pub const HEADER_LEN: usize = 5;

/// The frame type the bench sends (and expects back from an echo server).
pub const KIND_DATA: u8 = 1;

/// Default maximum payload when a tool is not told otherwise (16 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 << 20;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    /// Payload length in bytes (the header itself not included).
    pub len: u32,
}

impl Header {
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let l = self.len.to_be_bytes();
        [self.kind, l[0], l[1], l[2], l[3]]
    }

    pub fn decode(b: [u8; HEADER_LEN]) -> Self {
        Self {
            kind: b[0],
            len: u32::from_be_bytes([b[1], b[2], b[3], b[4]]),
        }
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame announces a {len}-byte payload, more than the maximum of {max} bytes")]
    TooLarge { len: u64, max: u32 },
    #[error("connection closed inside a frame ({got} of {want} bytes received)")]
    Truncated { got: usize, want: usize },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A frame of a decoded buffer, borrowing its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub payload: &'a [u8],
}

/// Encoder/decoder with a maximum payload size enforced both ways.
#[derive(Clone, Copy, Debug)]
pub struct Codec {
    max_payload: u32,
}

impl Codec {
    pub fn new(max_payload: u32) -> Self {
        Self { max_payload }
    }

    pub fn max_payload(self) -> u32 {
        self.max_payload
    }

    /// Accepts a header whose announced length is within the maximum.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`].
    pub fn check(self, h: Header) -> Result<Header, FrameError> {
        if h.len > self.max_payload {
            return Err(FrameError::TooLarge {
                len: u64::from(h.len),
                max: self.max_payload,
            });
        }
        Ok(h)
    }

    /// Appends one frame to `out`.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] if the payload exceeds the maximum: the sender refuses to
    /// produce what the receiver would refuse to read.
    pub fn encode(self, kind: u8, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= self.max_payload)
            .ok_or(FrameError::TooLarge {
                len: payload.len() as u64,
                max: self.max_payload,
            })?;
        out.reserve(HEADER_LEN + payload.len());
        out.extend_from_slice(&Header { kind, len }.encode());
        out.extend_from_slice(payload);
        Ok(())
    }

    /// Decodes the first frame of `buf`. `Ok(None)`: more bytes are needed. On success also
    /// returns how many bytes the frame took. The length is checked as soon as the header is
    /// complete, without waiting for the payload.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`].
    pub fn decode(self, buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let h = self.check(Header::decode(*head))?;
        let end = HEADER_LEN + h.len as usize;
        Ok(buf.get(HEADER_LEN..end).map(|payload| {
            (
                Frame {
                    kind: h.kind,
                    payload,
                },
                end,
            )
        }))
    }

    /// Reads one header. `Ok(None)`: clean end of stream before the first byte.
    ///
    /// # Errors
    /// End of stream inside the header, an I/O error, or a length over the maximum.
    pub async fn read_header<R: AsyncRead + Unpin>(
        self,
        r: &mut R,
    ) -> Result<Option<Header>, FrameError> {
        let mut head = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut head[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => {
                    return Err(FrameError::Truncated {
                        got,
                        want: HEADER_LEN,
                    });
                }
                n => got += n,
            }
        }
        self.check(Header::decode(head)).map(Some)
    }

    /// Reads one whole frame, its payload into `payload` (reused between calls; grown only
    /// after the length was accepted). `Ok(None)`: clean end of stream between frames.
    ///
    /// # Errors
    /// See [`Codec::read_header`]; also an end of stream inside the payload.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        self,
        r: &mut R,
        payload: &mut Vec<u8>,
    ) -> Result<Option<u8>, FrameError> {
        let Some(h) = self.read_header(r).await? else {
            return Ok(None);
        };
        let want = h.len as usize;
        payload.clear();
        payload.resize(want, 0);
        let mut got = 0;
        while got < want {
            match r.read(&mut payload[got..]).await? {
                0 => {
                    return Err(FrameError::Truncated {
                        got: HEADER_LEN + got,
                        want: HEADER_LEN + want,
                    });
                }
                n => got += n,
            }
        }
        Ok(Some(h.kind))
    }
}

/// Follows frame boundaries through a byte stream without buffering it, so a relay of the
/// stream (the echo server) can check every announced length while passing bytes straight
/// through.
#[derive(Clone, Debug)]
pub struct Scanner {
    codec: Codec,
    head: [u8; HEADER_LEN],
    /// Header bytes seen of the current frame (0..HEADER_LEN); HEADER_LEN means in the payload.
    head_len: usize,
    /// Payload bytes still to come of the current frame.
    remaining: u64,
}

impl Scanner {
    pub fn new(codec: Codec) -> Self {
        Self {
            codec,
            head: [0; HEADER_LEN],
            head_len: 0,
            remaining: 0,
        }
    }

    /// Consumes the next chunk of the stream.
    ///
    /// # Errors
    /// A header announcing too much; with it, how many bytes of `chunk` came before that
    /// header started (they belong to well-formed frames and may still be answered).
    pub fn scan(&mut self, chunk: &[u8]) -> Result<(), (usize, FrameError)> {
        let mut i = 0;
        while i < chunk.len() {
            if self.head_len < HEADER_LEN {
                let take = (HEADER_LEN - self.head_len).min(chunk.len() - i);
                self.head[self.head_len..self.head_len + take].copy_from_slice(&chunk[i..i + take]);
                self.head_len += take;
                i += take;
                if self.head_len == HEADER_LEN {
                    let h = self
                        .codec
                        .check(Header::decode(self.head))
                        .map_err(|e| (i.saturating_sub(HEADER_LEN), e))?;
                    self.remaining = u64::from(h.len);
                    if self.remaining == 0 {
                        self.head_len = 0;
                    }
                }
            } else {
                let take = self.remaining.min((chunk.len() - i) as u64);
                self.remaining -= take;
                i += take as usize;
                if self.remaining == 0 {
                    self.head_len = 0;
                }
            }
        }
        Ok(())
    }

    /// Called at end of stream.
    ///
    /// # Errors
    /// [`FrameError::Truncated`] if the stream ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.head_len {
            0 => Ok(()),
            n if n < HEADER_LEN => Err(FrameError::Truncated {
                got: n,
                want: HEADER_LEN,
            }),
            _ => {
                let len =
                    u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                let want = HEADER_LEN + len as usize;
                Err(FrameError::Truncated {
                    got: want - self.remaining as usize,
                    want,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Codec::new(1024).encode(kind, payload, &mut out).unwrap();
        out
    }

    #[test]
    fn header_is_type_then_big_endian_length() {
        assert_eq!(frame(7, b"abc"), [7, 0, 0, 0, 3, b'a', b'b', b'c']);
        let h = Header {
            kind: 2,
            len: 0x0102_0304,
        };
        assert_eq!(h.encode(), [2, 1, 2, 3, 4]);
        assert_eq!(Header::decode(h.encode()), h);
    }

    #[test]
    fn decode_waits_for_a_whole_frame_and_reports_its_size() {
        let codec = Codec::new(1024);
        let mut buf = frame(KIND_DATA, b"hello");
        buf.extend_from_slice(&frame(3, b""));
        for cut in 0..HEADER_LEN + 5 {
            assert_eq!(codec.decode(&buf[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (f, used) = codec.decode(&buf).unwrap().unwrap();
        assert_eq!((f.kind, f.payload, used), (KIND_DATA, &b"hello"[..], 10));
        let (f, used) = codec.decode(&buf[used..]).unwrap().unwrap();
        assert_eq!((f.kind, f.payload, used), (3, &b""[..], HEADER_LEN));
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let codec = Codec::new(16);
        let head = Header {
            kind: KIND_DATA,
            len: 17,
        }
        .encode();
        let e = codec.decode(&head).unwrap_err();
        assert!(
            matches!(e, FrameError::TooLarge { len: 17, max: 16 }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "frame announces a 17-byte payload, more than the maximum of 16 bytes"
        );
        // Exactly the maximum is fine.
        assert!(codec.decode(&frame(1, &[0; 16])).unwrap().is_some());
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        let mut out = Vec::new();
        let e = Codec::new(4).encode(1, b"12345", &mut out).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { len: 5, max: 4 }));
        assert!(out.is_empty(), "nothing written on refusal");
    }

    #[tokio::test]
    async fn read_frame_reads_in_sequence_and_ends_cleanly() {
        let mut bytes = frame(1, b"one");
        bytes.extend_from_slice(&frame(2, b"second"));
        let mut r = &bytes[..];
        let codec = Codec::new(64);
        let mut p = Vec::new();
        assert_eq!(codec.read_frame(&mut r, &mut p).await.unwrap(), Some(1));
        assert_eq!(p, b"one");
        assert_eq!(codec.read_frame(&mut r, &mut p).await.unwrap(), Some(2));
        assert_eq!(p, b"second");
        assert_eq!(codec.read_frame(&mut r, &mut p).await.unwrap(), None);
    }

    #[tokio::test]
    async fn read_frame_reports_truncation() {
        let codec = Codec::new(64);
        let mut p = Vec::new();
        let whole = frame(1, b"payload");
        let mut r = &whole[..3];
        let e = codec.read_frame(&mut r, &mut p).await.unwrap_err();
        assert!(
            matches!(e, FrameError::Truncated { got: 3, want: 5 }),
            "{e}"
        );
        let mut r = &whole[..whole.len() - 2];
        let e = codec.read_frame(&mut r, &mut p).await.unwrap_err();
        assert!(
            matches!(e, FrameError::Truncated { got: 10, want: 12 }),
            "{e}"
        );
        assert!(e.to_string().contains("10 of 12 bytes"), "{e}");
    }

    #[tokio::test]
    async fn bad_length_never_allocates() {
        let codec = Codec::new(1024);
        let head = Header {
            kind: 1,
            len: u32::MAX,
        }
        .encode();
        let mut r = &head[..];
        let mut p = Vec::new();
        let e = codec.read_frame(&mut r, &mut p).await.unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");
        assert_eq!(p.capacity(), 0, "the payload buffer was never grown");
    }

    #[test]
    fn scanner_follows_frames_across_any_split() {
        let codec = Codec::new(8);
        let mut stream = frame(1, b"abc");
        stream.extend_from_slice(&frame(1, b""));
        stream.extend_from_slice(&frame(9, b"12345678"));
        for split in 0..=stream.len() {
            let mut s = Scanner::new(codec);
            s.scan(&stream[..split]).unwrap();
            s.scan(&stream[split..]).unwrap();
            s.finish().unwrap();
        }
        // Byte by byte, too.
        let mut s = Scanner::new(codec);
        for b in &stream {
            s.scan(std::slice::from_ref(b)).unwrap();
        }
        s.finish().unwrap();
    }

    #[test]
    fn scanner_stops_at_an_oversize_header() {
        let codec = Codec::new(8);
        let mut stream = frame(1, b"ok");
        let good = stream.len();
        stream.extend_from_slice(&Header { kind: 1, len: 9 }.encode());
        stream.extend_from_slice(b"never looked at");
        let mut s = Scanner::new(codec);
        let (at, e) = s.scan(&stream).unwrap_err();
        assert_eq!(at, good);
        assert!(matches!(e, FrameError::TooLarge { len: 9, max: 8 }));
    }

    #[test]
    fn scanner_reports_a_stream_cut_inside_a_frame() {
        let codec = Codec::new(8);
        let whole = frame(1, b"abcd");
        let mut s = Scanner::new(codec);
        s.scan(&whole[..2]).unwrap();
        assert!(matches!(
            s.finish(),
            Err(FrameError::Truncated { got: 2, want: 5 })
        ));
        let mut s = Scanner::new(codec);
        s.scan(&whole[..7]).unwrap();
        assert!(matches!(
            s.finish(),
            Err(FrameError::Truncated { got: 7, want: 9 })
        ));
    }
}
