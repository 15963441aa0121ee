// Package pageproto is the wire format of the memory pool's page protocol
// (ALPN onebox-page/1 on the fabric port, mutual TLS): fixed 40-byte
// headers followed by a bounded payload, hand-written because it is the
// hot path of every remote page fault.
//
// Every frame is
//
//	off size
//	0   2    magic 0x0B 0x50
//	2   1    op (a request; its response has the high bit set)
//	3   1    owner length: the payload starts with that many bytes of owner
//	4   4    payload length (owner + data), at most MaxPayload
//	8   8    request id, echoed in the response
//	16  8    region
//	24  8    offset in the region (a multiple of PageSize)
//	32  8    argument: a length (Load, Drop), bytes (Reserve, Release), the
//	         client's instance (Hello); in a response, the Status
//
// all big-endian. Requests may be pipelined on one connection; responses
// carry the request id and may come in any order. A frame that breaks a
// rule is answered with StatusBadFrame and a message, and the connection
// is closed.
package pageproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// PageSize is the unit of every offset and length.
const PageSize = 4096

// HeaderSize is the size of every frame header.
const HeaderSize = 40

// MaxData bounds the pages of one Store or Load (one 2 MiB huge page).
const MaxData = 2 << 20

// MaxOwner bounds the owner name.
const MaxOwner = 255

// MaxPayload bounds a frame's payload.
const MaxPayload = MaxData + MaxOwner

// MaxDrop bounds the range of one Drop (1 TiB).
const MaxDrop = 1 << 40

const (
	magic0 = 0x0B
	magic1 = 0x50
)

// Op is a request kind; a response has RespBit set.
type Op uint8

// Requests.
const (
	// OpHello must be the first frame: Arg is the client's instance (a
	// random number per client process). A different instance from the
	// same node means it restarted: the server drops what the old one
	// stored. The response payload is a Stat.
	OpHello Op = 1 + iota
	// OpStore: payload owner + pages, kept at Offset of (owner, Region).
	OpStore
	// OpLoad: Arg bytes from Offset; the response payload is the pages
	// (zeros for pages not held).
	OpLoad
	// OpDrop: forget Arg bytes from Offset.
	OpDrop
	// OpDropOwner: forget every page and reservation of owner.
	OpDropOwner
	// OpReserve: account Arg more bytes of capacity to owner, or fail
	// with StatusFull.
	OpReserve
	// OpRelease: give back Arg bytes reserved by owner.
	OpRelease
	// OpStat: the response payload is a Stat.
	OpStat
	opEnd
)

// Request reports whether o is a known request.
func (o Op) Request() bool { return o > 0 && o < opEnd }

// RespBit marks a response.
const RespBit Op = 0x80

var opNames = [...]string{"", "hello", "store", "load", "drop", "drop_owner", "reserve", "release", "stat"}

func (o Op) String() string {
	if o == RespBit {
		return "error_response"
	}
	if r := o &^ RespBit; r > 0 && r < opEnd {
		if o&RespBit != 0 {
			return opNames[r] + "_response"
		}
		return opNames[r]
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Status is a response's result, carried in Arg.
type Status uint64

// Statuses.
const (
	StatusOK Status = iota
	// StatusFull: the node's donated memory cannot hold the pages or the
	// reservation; nothing was stored.
	StatusFull
	// StatusBadFrame: the request broke the protocol; the payload says
	// how, and the server closes the connection.
	StatusBadFrame
	// StatusClosing: the server is shutting down.
	StatusClosing
)

func (s Status) String() string {
	switch s {
	case StatusOK:
		return "ok"
	case StatusFull:
		return "full"
	case StatusBadFrame:
		return "bad_frame"
	case StatusClosing:
		return "closing"
	}
	return fmt.Sprintf("status(%d)", uint64(s))
}

// Header is a decoded frame header.
type Header struct {
	Op       Op
	OwnerLen uint8
	Length   uint32 // payload bytes, owner included
	ID       uint64
	Region   uint64
	Offset   uint64
	Arg      uint64
}

// DataLen is the payload without the owner.
func (h *Header) DataLen() int { return int(h.Length) - int(h.OwnerLen) }

// ErrBadFrame is wrapped by every decoding error.
var ErrBadFrame = errors.New("pageproto: bad frame")

func bad(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadFrame, fmt.Sprintf(format, args...))
}

// Put writes h into b[:HeaderSize].
func (h *Header) Put(b []byte) {
	_ = b[HeaderSize-1]
	b[0], b[1], b[2], b[3] = magic0, magic1, byte(h.Op), h.OwnerLen
	binary.BigEndian.PutUint32(b[4:], h.Length)
	binary.BigEndian.PutUint64(b[8:], h.ID)
	binary.BigEndian.PutUint64(b[16:], h.Region)
	binary.BigEndian.PutUint64(b[24:], h.Offset)
	binary.BigEndian.PutUint64(b[32:], h.Arg)
}

// Parse decodes and checks a header: the magic, a known op, the bounds of
// the lengths, and the rules of each op (page alignment, what may carry a
// payload). A response (RespBit) is checked only for its framing.
func Parse(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, bad("header of %d bytes, want %d", len(b), HeaderSize)
	}
	if b[0] != magic0 || b[1] != magic1 {
		return Header{}, bad("magic %#02x%02x, want %#02x%02x (not a page protocol peer?)", b[0], b[1], magic0, magic1)
	}
	h := Header{
		Op: Op(b[2]), OwnerLen: b[3],
		Length: binary.BigEndian.Uint32(b[4:]),
		ID:     binary.BigEndian.Uint64(b[8:]),
		Region: binary.BigEndian.Uint64(b[16:]),
		Offset: binary.BigEndian.Uint64(b[24:]),
		Arg:    binary.BigEndian.Uint64(b[32:]),
	}
	if h.Length > MaxPayload {
		return h, bad("payload of %d bytes, at most %d allowed", h.Length, MaxPayload)
	}
	if uint32(h.OwnerLen) > h.Length {
		return h, bad("owner of %d bytes in a payload of %d", h.OwnerLen, h.Length)
	}
	op := h.Op &^ RespBit
	if h.Op == RespBit { // the answer to a frame too broken to name its op
		return h, nil
	}
	if op == 0 || op >= opEnd {
		return h, bad("unknown op %d", uint8(h.Op))
	}
	if h.Op&RespBit != 0 {
		if h.OwnerLen != 0 {
			return h, bad("%v with an owner", h.Op)
		}
		return h, nil
	}
	return h, h.checkRequest()
}

func (h *Header) checkRequest() error {
	data := h.DataLen()
	needOwner := h.Op != OpHello && h.Op != OpStat
	switch {
	case needOwner && h.OwnerLen == 0:
		return bad("%v without an owner", h.Op)
	case !needOwner && h.Length != 0:
		return bad("%v with a payload", h.Op)
	case h.Offset%PageSize != 0:
		return bad("%v at offset %d, not a multiple of %d", h.Op, h.Offset, PageSize)
	case h.Op != OpStore && data != 0:
		return bad("%v with %d bytes of data", h.Op, data)
	}
	switch h.Op {
	case OpStore:
		if data == 0 || data%PageSize != 0 {
			return bad("store of %d bytes, want a whole number of pages", data)
		}
		if h.Offset > MaxDrop {
			return bad("store at offset %d, beyond %d", h.Offset, uint64(MaxDrop))
		}
	case OpLoad:
		if h.Arg == 0 || h.Arg%PageSize != 0 || h.Arg > MaxData {
			return bad("load of %d bytes, want 1 to %d pages", h.Arg, MaxData/PageSize)
		}
	case OpDrop:
		if h.Arg%PageSize != 0 || h.Arg > MaxDrop {
			return bad("drop of %d bytes, want a whole number of pages up to %d", h.Arg, uint64(MaxDrop))
		}
	}
	return nil
}

// Stat is a server's account, the payload of OpHello and OpStat responses.
type Stat struct {
	Instance uint64 // random per server process: a change means it restarted
	Capacity uint64 // donated bytes
	Used     uint64 // bytes of pages held
	Reserved uint64 // bytes reserved by owners
}

// StatSize is the encoded size of a Stat.
const StatSize = 32

// Append appends the encoded s to b.
func (s Stat) Append(b []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, s.Instance)
	b = binary.BigEndian.AppendUint64(b, s.Capacity)
	b = binary.BigEndian.AppendUint64(b, s.Used)
	return binary.BigEndian.AppendUint64(b, s.Reserved)
}

// ParseStat decodes a Stat.
func ParseStat(b []byte) (Stat, error) {
	if len(b) != StatSize {
		return Stat{}, bad("stat of %d bytes, want %d", len(b), StatSize)
	}
	return Stat{
		Instance: binary.BigEndian.Uint64(b),
		Capacity: binary.BigEndian.Uint64(b[8:]),
		Used:     binary.BigEndian.Uint64(b[16:]),
		Reserved: binary.BigEndian.Uint64(b[24:]),
	}, nil
}

// ReadFrame reads one frame from r: its header, checked by Parse, and its
// payload into buf (grown if needed, never beyond MaxPayload). A stream
// that ends inside a frame is io.ErrUnexpectedEOF; one that ends between
// frames is io.EOF.
func ReadFrame(r io.Reader, buf []byte) (Header, []byte, error) {
	var hb [HeaderSize]byte
	if _, err := io.ReadFull(r, hb[:]); err != nil {
		return Header{}, buf, err
	}
	h, err := Parse(hb[:])
	if err != nil {
		return h, buf, err
	}
	if cap(buf) < int(h.Length) {
		buf = make([]byte, h.Length)
	}
	p := buf[:h.Length]
	if _, err := io.ReadFull(r, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return h, buf, fmt.Errorf("%w: truncated %v payload (%d bytes announced): %w", ErrBadFrame, h.Op, h.Length, err)
	}
	return h, p, nil
}

// AppendFrame appends a whole frame (header, owner, data) to b, setting
// h.OwnerLen and h.Length.
func AppendFrame(b []byte, h Header, owner string, data []byte) []byte {
	h.OwnerLen = uint8(len(owner))
	h.Length = uint32(len(owner) + len(data))
	n := len(b)
	b = append(b, make([]byte, HeaderSize)...)
	h.Put(b[n:])
	b = append(b, owner...)
	return append(b, data...)
}
