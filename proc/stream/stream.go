// Package stream is the wire format that carries a running program's stdio,
// signals and exit status between the onebox CLI, its local agent and the
// agent that runs the program: a hand-written binary framing, strict to
// decode and bounded in size.
//
// A frame is one type byte, a 4-byte big-endian payload length and the
// payload (at most MaxPayload bytes). The same framing runs on the CLI's
// unix socket (after an HTTP upgrade) and between agents on the fabric
// port (ALPN pki.ProtoProc, mutual TLS).
//
// A session: the caller sends Start (JSON Spec); the runner answers
// Started (JSON Started), NotStarted (JSON NotStartedInfo: the program is
// not there or not executable, with the status a shell gives) or Error. Then the caller sends Stdin, StdinEOF
// and Signal frames; the runner sends Stdout and Stderr frames and ends
// with one Exit frame (or an Error frame if the program was lost), after
// which it closes the connection. A caller that hangs up is a terminal
// hangup: the program's process group gets SIGHUP.
//
// Migration (proc/migrate) adds frames on the same connections. A runner
// whose program moved to another node sends Moved (JSON MovedInfo) instead
// of Exit: the caller's agent then dials that node and sends Attach (JSON
// AttachInfo) as its first frame, and the stream goes on from there. The
// source agent of a migration opens a session with Migrate (JSON, see
// proc/migrate) and sends the checkpoint's image files as File frames
// (a name, a NUL, data) ended by FilesDone; both sides then carry CRIU's
// page-server stream in Pages frames (PagesEOF: that side's CRIU closed
// its end); the target answers Restored (JSON) once the program runs there,
// and Done when every page has arrived, or Error.
package stream

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/onebox-project/onebox/fabric/pki"
)

// ALPN is the fabric protocol that carries streams between agents.
const ALPN = pki.ProtoProc

// Upgrade is the HTTP Upgrade token used on the agent's unix socket.
const Upgrade = "onebox-proc/1"

// MaxPayload bounds a frame's payload; a longer frame is refused before
// its payload is read.
const MaxPayload = 1 << 20

// ChunkSize is how much stdio data a writer puts in one frame.
const ChunkSize = 32 << 10

// HeaderSize is the size of a frame header: type byte + length.
const HeaderSize = 5

// Type is a frame's type.
type Type byte

// Frame types.
const (
	Start    Type = 1 // caller → runner: JSON Spec
	Started  Type = 2 // runner → caller: JSON StartedInfo
	Stdin    Type = 3 // caller → runner: data (non-empty)
	Stdout   Type = 4 // runner → caller: data (non-empty)
	Stderr   Type = 5 // runner → caller: data (non-empty)
	StdinEOF Type = 6 // caller → runner: empty
	Signal   Type = 7 // caller → runner: 1 byte, signal number 1..64
	Exit     Type = 8 // runner → caller: 2 bytes, see ExitStatus
	Error    Type = 9 // either way: UTF-8 text, non-empty

	Moved     Type = 10 // runner → caller: JSON MovedInfo; the last frame
	Attach    Type = 11 // caller → runner, first frame: JSON AttachInfo
	Migrate   Type = 12 // source → target, first frame: JSON (proc/migrate)
	File      Type = 13 // source → target: file name, NUL, data
	FilesDone Type = 14 // source → target: empty
	Pages     Type = 15 // either way: page-server bytes (non-empty)
	PagesEOF  Type = 16 // either way: empty
	Restored  Type = 17 // target → source: JSON (proc/migrate)
	Done      Type = 18 // target → source: JSON (proc/migrate)
	// NotStarted: runner → caller instead of Started: the program could
	// not be started; JSON NotStartedInfo (the exit status a shell gives).
	NotStarted Type = 19

	lastType = NotStarted
)

var typeNames = [...]string{Start: "start", Started: "started", Stdin: "stdin", Stdout: "stdout", Stderr: "stderr",
	StdinEOF: "stdin-eof", Signal: "signal", Exit: "exit", Error: "error",
	Moved: "moved", Attach: "attach", Migrate: "migrate", File: "file", FilesDone: "files-done", Pages: "pages",
	PagesEOF: "pages-eof", Restored: "restored", Done: "done", NotStarted: "not-started"}

func (t Type) String() string {
	if t >= Start && t <= lastType {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", byte(t))
}

// Frame is one decoded frame.
type Frame struct {
	Type    Type
	Payload []byte
}

// Decoding errors.
var (
	ErrShort   = errors.New("stream: incomplete frame")
	ErrType    = errors.New("stream: unknown frame type")
	ErrTooLong = fmt.Errorf("stream: frame payload longer than %d bytes", MaxPayload)
)

// checkHeader validates a frame header and returns the type and length.
func checkHeader(h []byte) (Type, int, error) {
	t := Type(h[0])
	n := binary.BigEndian.Uint32(h[1:5])
	if t < Start || t > lastType {
		return 0, 0, fmt.Errorf("%w %d", ErrType, h[0])
	}
	if n > MaxPayload {
		return 0, 0, ErrTooLong
	}
	return t, int(n), nil
}

// checkPayload applies the per-type rules to a payload.
func checkPayload(t Type, p []byte) error {
	bad := func(why string) error { return fmt.Errorf("stream: bad %s frame: %s", t, why) }
	switch t {
	case Start, Started, Moved, Attach, Migrate, Restored, Done, NotStarted:
		if !json.Valid(p) {
			return bad("payload is not JSON")
		}
	case Stdin, Stdout, Stderr, Pages:
		if len(p) == 0 {
			return bad("empty data")
		}
	case File:
		if _, _, err := SplitFile(p); err != nil {
			return err
		}
	case StdinEOF, FilesDone, PagesEOF:
		if len(p) != 0 {
			return bad("payload must be empty")
		}
	case Signal:
		if len(p) != 1 || p[0] < 1 || p[0] > 64 {
			return bad("want one byte, a signal number 1..64")
		}
	case Exit:
		if _, err := DecodeExit(p); err != nil {
			return err
		}
	case Error:
		if len(p) == 0 || !utf8.Valid(p) {
			return bad("want non-empty UTF-8 text")
		}
	}
	return nil
}

// Decode decodes the frame at the start of b and returns it with the
// number of bytes it took. It returns ErrShort if b holds only part of a
// (so far valid) frame. The payload aliases b.
func Decode(b []byte) (Frame, int, error) {
	if len(b) < HeaderSize {
		if len(b) > 0 && (Type(b[0]) < Start || Type(b[0]) > lastType) {
			return Frame{}, 0, fmt.Errorf("%w %d", ErrType, b[0])
		}
		return Frame{}, 0, ErrShort
	}
	t, n, err := checkHeader(b)
	if err != nil {
		return Frame{}, 0, err
	}
	if len(b) < HeaderSize+n {
		return Frame{}, 0, ErrShort
	}
	p := b[HeaderSize : HeaderSize+n]
	if err := checkPayload(t, p); err != nil {
		return Frame{}, 0, err
	}
	return Frame{Type: t, Payload: p}, HeaderSize + n, nil
}

// Append appends the encoding of a frame to b. It panics on a payload
// longer than MaxPayload (a programming error: writers chunk their data).
func Append(b []byte, t Type, p []byte) []byte {
	if len(p) > MaxPayload {
		panic("stream: payload too long")
	}
	b = append(b, byte(t))
	b = binary.BigEndian.AppendUint32(b, uint32(len(p)))
	return append(b, p...)
}

// ReadFrame reads one frame from r. The payload is freshly allocated. At
// the end of the stream before a frame starts it returns io.EOF; a stream
// that ends inside a frame is io.ErrUnexpectedEOF.
func ReadFrame(r io.Reader) (Frame, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Frame{}, err
	}
	t, n, err := checkHeader(h[:])
	if err != nil {
		return Frame{}, err
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	if err := checkPayload(t, p); err != nil {
		return Frame{}, err
	}
	return Frame{Type: t, Payload: p}, nil
}

// ExitStatus is how a program ended: with an exit code, or killed by a
// signal (Signal > 0).
type ExitStatus struct {
	Code   int // 0..255, when Signal is 0
	Signal int // 1..64, or 0
}

// ShellCode is the status a shell would report: the code, or 128+signal.
func (e ExitStatus) ShellCode() int {
	if e.Signal > 0 {
		return 128 + e.Signal
	}
	return e.Code
}

// EncodeExit encodes an exit status as an Exit payload: [0, code] or
// [1, signal].
func EncodeExit(e ExitStatus) []byte {
	if e.Signal > 0 {
		return []byte{1, byte(e.Signal)}
	}
	return []byte{0, byte(e.Code)}
}

// DecodeExit decodes an Exit payload strictly.
func DecodeExit(p []byte) (ExitStatus, error) {
	if len(p) != 2 {
		return ExitStatus{}, errors.New("stream: bad exit frame: want 2 bytes")
	}
	switch p[0] {
	case 0:
		return ExitStatus{Code: int(p[1])}, nil
	case 1:
		if p[1] < 1 || p[1] > 64 {
			return ExitStatus{}, errors.New("stream: bad exit frame: signal out of range 1..64")
		}
		return ExitStatus{Signal: int(p[1])}, nil
	}
	return ExitStatus{}, errors.New("stream: bad exit frame: unknown kind")
}

// Spec is the Start frame: what to run and where.
type Spec struct {
	Argv []string `json:"argv"`
	// Env is the caller's environment, passed to the program as is.
	Env []string `json:"env"`
	// Dir is the caller's working directory; the program starts there if
	// it exists on the target node, else in /.
	Dir string `json:"dir"`
	// Node is the target node; empty: the local agent's node (unless Best).
	Node string `json:"node,omitempty"`
	// Best: the alive node with the lowest load per CPU.
	Best bool `json:"best,omitempty"`
	// NoBalance: with Best, the load balancer must not move the program
	// afterwards (it may by default).
	NoBalance bool `json:"no_balance,omitempty"`
	// Detach: no stdio stream; output goes to a log file on the node.
	Detach bool `json:"detach,omitempty"`
	// Home is the node where 'onebox run' was issued (set by that
	// node's agent, not by the CLI).
	Home string `json:"home,omitempty"`
	// MemoryExpand: back the program's large allocations by the cluster
	// memory pool, keeping at most LocalMemory bytes resident here
	// (0: the node's default).
	MemoryExpand bool   `json:"memory_expand,omitempty"`
	LocalMemory  uint64 `json:"local_memory,omitempty"`
}

// MaxArgs bounds argv and the environment, each.
const MaxArgs = 4096

// Validate checks a Spec received from the wire.
func (s *Spec) Validate() error {
	switch {
	case len(s.Argv) == 0 || s.Argv[0] == "":
		return errors.New("stream: no program to run")
	case len(s.Argv) > MaxArgs || len(s.Env) > MaxArgs:
		return fmt.Errorf("stream: more than %d arguments or environment entries", MaxArgs)
	case s.Best && s.Node != "":
		return errors.New("stream: --node and --best exclude each other")
	}
	return nil
}

// StartedInfo is the Started frame: where the program runs.
type StartedInfo struct {
	GID  string `json:"gid"`
	Node string `json:"node"`
	PID  int    `json:"pid"`
	Log  string `json:"log,omitempty"` // detached: the log file on Node
}

// NotStartedInfo is the NotStarted frame: why, and the status a shell
// would give (127: not found, 126: found but not executable).
type NotStartedInfo struct {
	Error string `json:"error"`
	Code  int    `json:"code"`
}

// MovedInfo is the Moved frame: the program now runs on Node.
type MovedInfo struct {
	GID    string `json:"gid"`
	Node   string `json:"node"`
	Reason string `json:"reason,omitempty"`
}

// AttachInfo is the Attach frame: the caller takes over the stdio of a
// program that migrated to the runner's node.
type AttachInfo struct {
	GID string `json:"gid"`
}

// MaxFileName bounds a File frame's name.
const MaxFileName = 255

// AppendFile encodes a File payload: name, NUL, data.
func AppendFile(b []byte, name string, data []byte) []byte {
	b = append(b, name...)
	b = append(b, 0)
	return append(b, data...)
}

// SplitFile decodes a File payload. The name must be a plain file name
// (no slash, not . or ..), 1..MaxFileName bytes.
func SplitFile(p []byte) (name string, data []byte, err error) {
	i := -1
	for k, c := range p {
		if c == 0 {
			i = k
			break
		}
		if k >= MaxFileName {
			break
		}
	}
	if i <= 0 {
		return "", nil, errors.New("stream: bad file frame: want a name of 1..255 bytes, NUL, data")
	}
	name = string(p[:i])
	if name == "." || name == ".." || strings.ContainsRune(name, '/') || !utf8.ValidString(name) {
		return "", nil, fmt.Errorf("stream: bad file frame: %q is not a plain file name", name)
	}
	return name, p[i+1:], nil
}

// Conn reads and writes frames on a connection. Reads are for one
// goroutine; writes may come from several (each frame is written whole).
type Conn struct {
	rwc io.ReadWriteCloser
	r   *bufio.Reader

	wmu sync.Mutex    // serializes writes
	buf []byte        // guarded by wmu
	wto time.Duration // guarded by wmu: bound on each frame's write
}

// SetWriteTimeout bounds the write of each frame to d (0: no bound, the
// default) on a connection that has write deadlines (net.Conn): a peer
// that reads nothing for d while the connection's buffers are full makes
// the write fail, rather than hold the writer for good. The deadline is
// set again before every frame, so a slow reader that keeps reading is
// never cut, however long the stream. After such a failure the
// connection is broken (TLS connections stay so): close it.
func (c *Conn) SetWriteTimeout(d time.Duration) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wto = d
}

// ErrWriteTimeout is wrapped in the error of a frame write that did not
// complete within the write timeout.
var ErrWriteTimeout = errors.New("stream: the peer read nothing within the write timeout")

// write writes b whole; c.wmu is held.
func (c *Conn) write(b []byte) error {
	if c.wto > 0 {
		if d, ok := c.rwc.(interface{ SetWriteDeadline(time.Time) error }); ok {
			_ = d.SetWriteDeadline(time.Now().Add(c.wto))
		}
	}
	_, err := c.rwc.Write(b)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("%w (%v): %w", ErrWriteTimeout, c.wto, err)
	}
	return err
}

// NewConn wraps rwc. br, if not nil, is a reader over rwc that may already
// hold buffered bytes (as after an HTTP hijack).
func NewConn(rwc io.ReadWriteCloser, br *bufio.Reader) *Conn {
	if br == nil {
		br = bufio.NewReaderSize(rwc, 64<<10)
	}
	return &Conn{rwc: rwc, r: br}
}

// Read reads the next frame.
func (c *Conn) Read() (Frame, error) { return ReadFrame(c.r) }

// ReadInto reads the next frame like Read, with its payload in buf when it
// fits (bulk data, e.g. pages, without an allocation per frame): the
// payload is valid until the next ReadInto with the same buf.
func (c *Conn) ReadInto(buf []byte) (Frame, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return Frame{}, err
	}
	t, n, err := checkHeader(h[:])
	if err != nil {
		return Frame{}, err
	}
	var p []byte
	if n <= cap(buf) {
		p = buf[:n]
	} else {
		p = make([]byte, n)
	}
	if _, err := io.ReadFull(c.r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	if err := checkPayload(t, p); err != nil {
		return Frame{}, err
	}
	return Frame{Type: t, Payload: p}, nil
}

// WriteEncoded writes frames already encoded (by Append, or a header put
// in front of data read in place) as they are.
func (c *Conn) WriteEncoded(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.write(b)
}

// PutHeader writes a frame header for a payload of n bytes of type t into
// h (HeaderSize bytes). It panics on n > MaxPayload.
func PutHeader(h []byte, t Type, n int) {
	if n > MaxPayload {
		panic("stream: payload too long")
	}
	h[0] = byte(t)
	binary.BigEndian.PutUint32(h[1:5], uint32(n))
}

// Write writes one frame.
func (c *Conn) Write(t Type, p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.buf = Append(c.buf[:0], t, p)
	err := c.write(c.buf)
	if cap(c.buf) > 2*ChunkSize+HeaderSize {
		c.buf = nil // do not pin a large Start frame's buffer
	}
	return err
}

// WriteJSON writes a frame with v as JSON payload.
func (c *Conn) WriteJSON(t Type, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > MaxPayload {
		return fmt.Errorf("stream: %s message of %d bytes exceeds %d", t, len(b), MaxPayload)
	}
	return c.Write(t, b)
}

// WriteError writes an Error frame with err's text.
func (c *Conn) WriteError(err error) error {
	msg := err.Error()
	if msg == "" {
		msg = "error"
	}
	if len(msg) > MaxPayload {
		msg = strings.ToValidUTF8(msg[:MaxPayload-8], "")
	}
	return c.Write(Error, []byte(msg))
}

// Close closes the connection.
func (c *Conn) Close() error { return c.rwc.Close() }

// Underlying returns the wrapped connection (for deadlines).
func (c *Conn) Underlying() io.ReadWriteCloser { return c.rwc }

// ChunkWriter turns writes into frames of type t, at most ChunkSize each.
type ChunkWriter struct {
	C *Conn
	T Type
}

func (w ChunkWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), ChunkSize)
		if err := w.C.Write(w.T, p[:k]); err != nil {
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}
