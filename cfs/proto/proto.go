// Package proto is the wire format of the cluster filesystem protocol
// (ALPN "onebox-fs/1"): length-prefixed binary frames carrying a request
// id and an operation, so many requests share one mutual-TLS connection
// per peer. Decoding is strict: a frame larger than MaxPayload, a length
// that runs past its frame, an over-long string or trailing bytes are
// errors, never guesses.
//
// Frame: u32 payload length | u32 request id | u8 op | payload.
// A reply carries the request's id, the op with ReplyBit set, and a payload
// that starts with a u32 errno (0: success) followed, on success, by the
// op's reply message. All integers are big-endian.
package proto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// ALPN is the protocol name negotiated on the fabric port.
const ALPN = "onebox-fs/1"

// Limits of the format.
const (
	HeaderSize = 9
	// MaxIO is the largest read or write carried by one request.
	MaxIO = 1 << 20
	// MaxPayload bounds a frame's payload: MaxIO of data plus room for
	// the fields around it.
	MaxPayload = MaxIO + 16<<10
	// MaxPath bounds a path (PATH_MAX), MaxName a directory entry name.
	MaxPath = 4096
	MaxName = 255
)

// Op is a request's operation.
type Op uint8

// Operations. Paths are relative to an export, "" being its root. The
// last component of a path is never followed if it is a symlink: a
// symlink is shown as a symlink (getattr, readdir, readlink), and the
// client's kernel resolves it. Symlinks in the components before the last
// are followed as long as they stay inside the export.
const (
	OpExports   Op = iota + 1 // Empty → ExportList
	OpGetattr                 // PathReq → Attr
	OpOpendir                 // PathReq → HandleReply
	OpReaddir                 // HandleReq → DirList (empty: end)
	OpOpen                    // OpenReq → HandleReply
	OpCreate                  // OpenReq → HandleReply (with Attr and Dir)
	OpRead                    // IOReq → Data
	OpWrite                   // IOReq → Count
	OpFsync                   // IOReq (Size 1: data only) → Empty
	OpClose                   // HandleReq → Empty
	OpFstat                   // HandleReq → Attr
	OpSetattr                 // SetattrReq → Attr
	OpMkdir                   // OpenReq → EntryReply
	OpUnlink                  // RemoveReq → Attr (of the directory, after)
	OpRmdir                   // RemoveReq → Attr (of the directory, after)
	OpRename                  // RenameReq → Empty
	OpStatfs                  // PathReq → Statfs
	OpReadlink                // PathReq → Data (the link's target)
	OpSymlink                 // SymlinkReq → Attr
	OpLink                    // LinkReq → Attr (the file's, one more link)
	OpFallocate               // FallocateReq → Empty
	opEnd
)

// ReplyBit marks a reply frame's op.
const ReplyBit Op = 0x80

// Valid reports whether op is a known request op.
func (op Op) Valid() bool { return op >= OpExports && op < opEnd }

func (op Op) String() string {
	names := [...]string{"", "exports", "getattr", "opendir", "readdir", "open", "create", "read", "write",
		"fsync", "close", "fstat", "setattr", "mkdir", "unlink", "rmdir", "rename", "statfs", "readlink", "symlink", "link", "fallocate"}
	if op&ReplyBit != 0 {
		return (op &^ ReplyBit).String() + "-reply"
	}
	if int(op) < len(names) && op != 0 {
		return names[op]
	}
	return fmt.Sprintf("op(%d)", uint8(op))
}

// Errors of the framing.
var (
	ErrFrameTooLarge = errors.New("proto: frame larger than the maximum")
	ErrMalformed     = errors.New("proto: malformed message")
)

// Frame is one decoded frame.
type Frame struct {
	ID      uint32
	Op      Op
	Payload []byte
}

// AppendFrame appends a frame's encoding to b.
func AppendFrame(b []byte, id uint32, op Op, payload []byte) []byte {
	return append(AppendHeader(b, id, op, len(payload)), payload...)
}

// AppendHeader appends the header of a frame whose payload is n bytes.
func AppendHeader(b []byte, id uint32, op Op, n int) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	b = binary.BigEndian.AppendUint32(b, id)
	return append(b, byte(op))
}

// AppendMsgFrame appends a frame carrying m, encoded in place.
func AppendMsgFrame(b []byte, id uint32, op Op, m Msg) []byte {
	start := len(b)
	b = AppendHeader(b, id, op, 0)
	b = AppendMarshal(b, m)
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-HeaderSize))
	return b
}

// AppendReplyFrame appends the reply to request (id, op): errno, then m
// on success, encoded in place.
func AppendReplyFrame(b []byte, id uint32, op Op, errno uint32, m Msg) []byte {
	start := len(b)
	b = AppendHeader(b, id, op|ReplyBit, 0)
	b = binary.BigEndian.AppendUint32(b, errno)
	if errno == 0 && m != nil {
		b = AppendMarshal(b, m)
	}
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-HeaderSize))
	return b
}

// DataReplyOffset is where the bytes of a successful read start in its
// reply frame (header, errno, length), so a server can read a file
// straight into the frame it sends.
const DataReplyOffset = HeaderSize + 8

// FinishDataReply completes a read reply frame allocated with at least
// DataReplyOffset+n bytes whose data (n bytes) is already in place.
func FinishDataReply(frame []byte, id uint32, op Op, n int) []byte {
	frame = frame[:DataReplyOffset+n]
	AppendHeader(frame[:0], id, op|ReplyBit, 8+n)
	binary.BigEndian.PutUint32(frame[HeaderSize:], 0)
	binary.BigEndian.PutUint32(frame[HeaderSize+4:], uint32(n))
	return frame
}

// ReadFrame reads one frame. The payload is freshly allocated.
func ReadFrame(r io.Reader) (Frame, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Frame{}, err
	}
	f, n, err := ParseHeader(h[:])
	if err != nil {
		return Frame{}, err
	}
	f.Payload = make([]byte, n)
	if _, err := io.ReadFull(r, f.Payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	return f, nil
}

// ParseHeader decodes a frame header and returns the payload length.
func ParseHeader(h []byte) (Frame, int, error) {
	if len(h) < HeaderSize {
		return Frame{}, 0, ErrMalformed
	}
	n := binary.BigEndian.Uint32(h)
	if n > MaxPayload {
		return Frame{}, 0, ErrFrameTooLarge
	}
	return Frame{ID: binary.BigEndian.Uint32(h[4:]), Op: Op(h[8])}, int(n), nil
}

// Msg is a message body.
type Msg interface {
	encode(e *enc)
	decode(d *dec)
}

// Marshal encodes m.
func Marshal(m Msg) []byte {
	var e enc
	m.encode(&e)
	return e.b
}

// AppendMarshal appends m's encoding to b.
func AppendMarshal(b []byte, m Msg) []byte {
	e := enc{b: b}
	m.encode(&e)
	return e.b
}

// Unmarshal decodes b into m; every byte must be consumed.
func Unmarshal(b []byte, m Msg) error {
	d := dec{b: b}
	m.decode(&d)
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(d.b))
	}
	return d.err
}

// Reply encodes a reply payload: errno, then m on success.
func Reply(errno uint32, m Msg) []byte {
	b := binary.BigEndian.AppendUint32(nil, errno)
	if errno == 0 && m != nil {
		b = AppendMarshal(b, m)
	}
	return b
}

// ParseReply splits a reply payload into its errno and, on success,
// decodes the rest into m (which may be nil for Empty replies).
func ParseReply(b []byte, m Msg) (errno uint32, err error) {
	if len(b) < 4 {
		return 0, ErrMalformed
	}
	errno = binary.BigEndian.Uint32(b)
	if errno != 0 {
		if len(b) != 4 {
			return 0, ErrMalformed
		}
		return errno, nil
	}
	if m == nil {
		m = &Empty{}
	}
	return 0, Unmarshal(b[4:], m)
}

type enc struct{ b []byte }

func (e *enc) u8(v uint8)   { e.b = append(e.b, v) }
func (e *enc) u32(v uint32) { e.b = binary.BigEndian.AppendUint32(e.b, v) }
func (e *enc) u64(v uint64) { e.b = binary.BigEndian.AppendUint64(e.b, v) }
func (e *enc) bytes(v []byte) {
	e.u32(uint32(len(v)))
	e.b = append(e.b, v...)
}
func (e *enc) str(v string) {
	e.u32(uint32(len(v)))
	e.b = append(e.b, v...)
}

type dec struct {
	b   []byte
	err error
}

func (d *dec) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", ErrMalformed, what)
	}
	d.b = nil
}

func (d *dec) take(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b) {
		d.fail("truncated " + what)
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *dec) u8() uint8 {
	if v := d.take(1, "u8"); v != nil {
		return v[0]
	}
	return 0
}

func (d *dec) u32() uint32 {
	if v := d.take(4, "u32"); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (d *dec) u64() uint64 {
	if v := d.take(8, "u64"); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func (d *dec) bool() bool {
	switch d.u8() {
	case 0:
		return false
	case 1:
		return true
	}
	d.fail("bool")
	return false
}

func (d *dec) bytes(max int) []byte {
	n := d.u32()
	if d.err == nil && n > uint32(max) {
		d.fail("byte string too long")
		return nil
	}
	// Aliases the message: frames are read into fresh buffers, so the
	// data of a read or write is never copied again.
	return d.take(int(n), "bytes")
}

// str decodes a string of at most max bytes without NUL bytes.
func (d *dec) str(max int) string {
	n := d.u32()
	if d.err == nil && n > uint32(max) {
		d.fail("string too long")
		return ""
	}
	v := d.take(int(n), "string")
	for _, c := range v {
		if c == 0 {
			d.fail("NUL in string")
			return ""
		}
	}
	return string(v)
}

// count decodes a list length; each element takes at least min bytes, so
// a length the remaining bytes cannot hold is refused before allocating.
func (d *dec) count(min int) int {
	n := d.u32()
	if d.err == nil && uint64(n)*uint64(min) > uint64(len(d.b)) {
		d.fail("list longer than its message")
		return 0
	}
	return int(n)
}
