package stream_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/proc/stream"
)

func raw(t stream.Type, n uint32, payload []byte) []byte {
	b := []byte{byte(t)}
	b = binary.BigEndian.AppendUint32(b, n)
	return append(b, payload...)
}

func TestALPNIsTheFabricConstant(t *testing.T) {
	if stream.ALPN != pki.ProtoProc {
		t.Fatalf("ALPN %q, pki.ProtoProc %q", stream.ALPN, pki.ProtoProc)
	}
}

func TestRoundTrip(t *testing.T) {
	frames := []stream.Frame{
		{stream.Start, []byte(`{"argv":["true"]}`)},
		{stream.Started, []byte(`{"gid":"g000000000001"}`)},
		{stream.Stdin, []byte("in")},
		{stream.Stdout, bytes.Repeat([]byte{0}, stream.ChunkSize)},
		{stream.Stderr, []byte("err\n")},
		{stream.StdinEOF, nil},
		{stream.Signal, []byte{2}},
		{stream.Exit, stream.EncodeExit(stream.ExitStatus{Code: 3})},
		{stream.Exit, stream.EncodeExit(stream.ExitStatus{Signal: 15})},
		{stream.Error, []byte("no such node")},
	}
	var b []byte
	for _, f := range frames {
		b = stream.Append(b, f.Type, f.Payload)
	}
	// Decode from the buffer and ReadFrame from a reader agree.
	r := bytes.NewReader(b)
	rest := b
	for i, want := range frames {
		got, n, err := stream.Decode(rest)
		if err != nil {
			t.Fatalf("frame %d: Decode: %v", i, err)
		}
		rest = rest[n:]
		got2, err := stream.ReadFrame(r)
		if err != nil {
			t.Fatalf("frame %d: ReadFrame: %v", i, err)
		}
		for _, g := range []stream.Frame{got, got2} {
			if g.Type != want.Type || !bytes.Equal(g.Payload, want.Payload) {
				t.Fatalf("frame %d: got %s %q, want %s %q", i, g.Type, g.Payload, want.Type, want.Payload)
			}
		}
	}
	if len(rest) != 0 {
		t.Errorf("%d bytes left over", len(rest))
	}
	if _, err := stream.ReadFrame(r); err != io.EOF {
		t.Errorf("after the last frame: %v, want io.EOF", err)
	}
}

func TestDecodeRejects(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want error // nil: any error but ErrShort
	}{
		{"type zero", raw(0, 0, nil), stream.ErrType},
		{"type too high", raw(20, 0, nil), stream.ErrType},
		{"not-started not JSON", raw(stream.NotStarted, 1, []byte("x")), nil},
		{"moved not JSON", raw(stream.Moved, 1, []byte("x")), nil},
		{"pages empty", raw(stream.Pages, 0, nil), nil},
		{"files-done with payload", raw(stream.FilesDone, 1, []byte{1}), nil},
		{"file without NUL", raw(stream.File, 3, []byte("abc")), nil},
		{"file empty name", raw(stream.File, 2, []byte{0, 1}), nil},
		{"file with slash", raw(stream.File, 6, []byte("../x\x00a")), nil},
		{"file dotdot", raw(stream.File, 3, []byte{'.', '.', 0}), nil},
		{"unknown type in a short header", []byte{0xff}, stream.ErrType},
		{"too long", raw(stream.Stdout, stream.MaxPayload+1, nil), stream.ErrTooLong},
		{"length 2^32-1", raw(stream.Stdout, 0xffffffff, nil), stream.ErrTooLong},
		{"empty stdout", raw(stream.Stdout, 0, nil), nil},
		{"empty stdin", raw(stream.Stdin, 0, nil), nil},
		{"stdin-eof with payload", raw(stream.StdinEOF, 1, []byte{1}), nil},
		{"signal zero", raw(stream.Signal, 1, []byte{0}), nil},
		{"signal 65", raw(stream.Signal, 1, []byte{65}), nil},
		{"signal two bytes", raw(stream.Signal, 2, []byte{1, 2}), nil},
		{"exit one byte", raw(stream.Exit, 1, []byte{0}), nil},
		{"exit unknown kind", raw(stream.Exit, 2, []byte{2, 0}), nil},
		{"exit signal zero", raw(stream.Exit, 2, []byte{1, 0}), nil},
		{"error empty", raw(stream.Error, 0, nil), nil},
		{"error not UTF-8", raw(stream.Error, 2, []byte{0xff, 0xfe}), nil},
		{"start not JSON", raw(stream.Start, 3, []byte("{{{")), nil},
		{"started empty", raw(stream.Started, 0, nil), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := stream.Decode(tt.in)
			if err == nil || errors.Is(err, stream.ErrShort) {
				t.Fatalf("Decode(%x) = %v, want a rejection", tt.in, err)
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("Decode: %v, want %v", err, tt.want)
			}
			if _, err := stream.ReadFrame(bytes.NewReader(tt.in)); err == nil {
				t.Errorf("ReadFrame accepted %x", tt.in)
			}
		})
	}
}

func TestShortAndTruncated(t *testing.T) {
	full := stream.Append(nil, stream.Stdout, []byte("hello"))
	for i := range len(full) {
		if _, _, err := stream.Decode(full[:i]); !errors.Is(err, stream.ErrShort) {
			t.Errorf("Decode of %d/%d bytes: %v, want ErrShort", i, len(full), err)
		}
		_, err := stream.ReadFrame(bytes.NewReader(full[:i]))
		want := io.ErrUnexpectedEOF
		if i == 0 {
			want = io.EOF
		}
		if !errors.Is(err, want) {
			t.Errorf("ReadFrame of %d/%d bytes: %v, want %v", i, len(full), err, want)
		}
	}
}

// A huge announced length is refused from the header alone: nothing is
// allocated or read for it.
func TestTooLongNotRead(t *testing.T) {
	r := &countingReader{r: bytes.NewReader(append(raw(stream.Stdout, stream.MaxPayload+1, nil), make([]byte, 100)...))}
	if _, err := stream.ReadFrame(r); !errors.Is(err, stream.ErrTooLong) {
		t.Fatalf("ReadFrame: %v", err)
	}
	if r.n != stream.HeaderSize {
		t.Errorf("read %d bytes, want only the %d-byte header", r.n, stream.HeaderSize)
	}
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestExitStatus(t *testing.T) {
	for _, e := range []stream.ExitStatus{{Code: 0}, {Code: 3}, {Code: 255}, {Signal: 2}, {Signal: 64}} {
		got, err := stream.DecodeExit(stream.EncodeExit(e))
		if err != nil || got != e {
			t.Errorf("round trip of %+v: %+v, %v", e, got, err)
		}
	}
	if c := (stream.ExitStatus{Signal: 2}).ShellCode(); c != 130 {
		t.Errorf("SIGINT shell code %d, want 130", c)
	}
	if c := (stream.ExitStatus{Code: 3}).ShellCode(); c != 3 {
		t.Errorf("exit 3 shell code %d", c)
	}
}

func TestSpecValidate(t *testing.T) {
	bad := []stream.Spec{{}, {Argv: []string{""}}, {Argv: []string{"x"}, Node: "n2", Best: true},
		{Argv: make([]string, stream.MaxArgs+1)}}
	bad[3].Argv[0] = "x"
	for _, s := range bad {
		if s.Validate() == nil {
			t.Errorf("Validate accepted %+v", s.Argv[:min(len(s.Argv), 2)])
		}
	}
	if err := (&stream.Spec{Argv: []string{"true"}}).Validate(); err != nil {
		t.Error(err)
	}
}

// Concurrent writers never interleave inside a frame, and ChunkWriter
// splits large writes.
func TestConnConcurrentWrites(t *testing.T) {
	a, b := net.Pipe()
	ca, cb := stream.NewConn(a, nil), stream.NewConn(b, nil)
	const writers, each = 4, 50
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cw := stream.ChunkWriter{C: ca, T: stream.Stdout}
			for range each {
				if _, err := cw.Write(bytes.Repeat([]byte{byte('a' + w)}, stream.ChunkSize+10)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	go func() { wg.Wait(); ca.Close() }()
	frames := 0
	for {
		f, err := cb.Read()
		if err != nil {
			break
		}
		frames++
		if f.Type != stream.Stdout || strings.Trim(string(f.Payload), string(f.Payload[:1])) != "" {
			t.Fatalf("interleaved or wrong frame: %s of %d bytes", f.Type, len(f.Payload))
		}
	}
	if frames != writers*each*2 {
		t.Errorf("%d frames, want %d", frames, writers*each*2)
	}
}

func TestWriteErrorLong(t *testing.T) {
	a, b := net.Pipe()
	ca, cb := stream.NewConn(a, nil), stream.NewConn(b, nil)
	go func() {
		_ = ca.WriteError(errors.New(strings.Repeat("é", stream.MaxPayload)))
		ca.Close()
	}()
	f, err := cb.Read()
	if err != nil || f.Type != stream.Error || len(f.Payload) > stream.MaxPayload {
		t.Fatalf("long error: %v %s %d", err, f.Type, len(f.Payload))
	}
}

func FuzzDecodeFrame(f *testing.F) {
	f.Add(stream.Append(nil, stream.Stdout, []byte("hello")))
	f.Add(stream.Append(nil, stream.Start, []byte(`{"argv":["sh"]}`)))
	f.Add(stream.Append(nil, stream.Exit, []byte{1, 9}))
	f.Add(stream.Append(nil, stream.StdinEOF, nil))
	f.Add(stream.Append(nil, stream.File, stream.AppendFile(nil, "core-1.img", []byte{1, 2})))
	f.Add(stream.Append(nil, stream.Moved, []byte(`{"gid":"g0123456789ab","node":"n2"}`)))
	f.Add(stream.Append(nil, stream.Pages, []byte{0}))
	f.Add(raw(stream.Signal, 1, []byte{65}))
	f.Add(raw(stream.Stdout, 0xffffffff, nil))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, n, err := stream.Decode(b)
		rf, rerr := stream.ReadFrame(bytes.NewReader(b))
		// ReadInto agrees with ReadFrame, whether the payload fits or not.
		for _, size := range []int{0, 64} {
			c := stream.NewConn(nopCloser{bytes.NewReader(b)}, nil)
			f2, err2 := c.ReadInto(make([]byte, size))
			if (err2 == nil) != (rerr == nil) || (err2 == nil && (f2.Type != rf.Type || !bytes.Equal(f2.Payload, rf.Payload))) {
				t.Fatalf("ReadInto(%d) = %v, %v; ReadFrame = %v, %v", size, f2, err2, rf, rerr)
			}
		}
		if err != nil {
			if errors.Is(err, stream.ErrShort) {
				if rerr == nil {
					t.Fatalf("ReadFrame decoded a frame Decode called short")
				}
				return
			}
			if rerr == nil {
				t.Fatalf("ReadFrame accepted what Decode refused (%v)", err)
			}
			return
		}
		if rerr != nil {
			t.Fatalf("Decode accepted what ReadFrame refused: %v", rerr)
		}
		if n < stream.HeaderSize || n > len(b) || len(fr.Payload) != n-stream.HeaderSize || len(fr.Payload) > stream.MaxPayload {
			t.Fatalf("bad length: n=%d payload=%d input=%d", n, len(fr.Payload), len(b))
		}
		if rf.Type != fr.Type || !bytes.Equal(rf.Payload, fr.Payload) {
			t.Fatalf("Decode and ReadFrame disagree")
		}
		// What decodes re-encodes to the same bytes.
		if re := stream.Append(nil, fr.Type, fr.Payload); !bytes.Equal(re, b[:n]) {
			t.Fatalf("re-encoding differs")
		}
	})
}

// BenchmarkChunkRoundTrip: encoding and decoding 32 KiB stdio frames, the
// stream's hot path (the rest is TLS and pipes).
func BenchmarkChunkRoundTrip(b *testing.B) {
	payload := bytes.Repeat([]byte("x"), stream.ChunkSize)
	var buf []byte
	b.SetBytes(int64(len(payload)))
	for b.Loop() {
		buf = stream.Append(buf[:0], stream.Stdout, payload)
		if _, err := stream.ReadFrame(bytes.NewReader(buf)); err != nil {
			b.Fatal(err)
		}
	}
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Write(p []byte) (int, error) { return len(p), nil }
func (nopCloser) Close() error                { return nil }

func TestWriteEncodedPutHeader(t *testing.T) {
	var out bytes.Buffer
	c := stream.NewConn(struct {
		io.Reader
		io.Writer
		io.Closer
	}{bytes.NewReader(nil), &out, io.NopCloser(nil)}, nil)
	buf := make([]byte, stream.HeaderSize+3)
	copy(buf[stream.HeaderSize:], "abc")
	stream.PutHeader(buf, stream.Pages, 3)
	if err := c.WriteEncoded(buf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), stream.Append(nil, stream.Pages, []byte("abc"))) {
		t.Fatalf("encoded %x", out.Bytes())
	}
}
