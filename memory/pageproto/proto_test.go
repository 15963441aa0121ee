package pageproto

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	data := bytes.Repeat([]byte{7}, 2*PageSize)
	f := AppendFrame(nil, Header{Op: OpStore, ID: 9, Region: 3, Offset: 8 * PageSize}, "n1/42", data)
	h, p, err := ReadFrame(bytes.NewReader(f), nil)
	if err != nil {
		t.Fatal(err)
	}
	if h.Op != OpStore || h.ID != 9 || h.Region != 3 || h.Offset != 8*PageSize || string(p[:h.OwnerLen]) != "n1/42" || !bytes.Equal(p[h.OwnerLen:], data) {
		t.Fatalf("got %+v", h)
	}
	s := Stat{Instance: 1, Capacity: 2, Used: 3, Reserved: 4}
	if got, err := ParseStat(s.Append(nil)); err != nil || got != s {
		t.Fatalf("stat %+v %v", got, err)
	}
}

func TestParseRejects(t *testing.T) {
	frame := func(h Header, owner string, data []byte) []byte { return AppendFrame(nil, h, owner, data) }
	for _, tc := range []struct {
		name, want string
		b          []byte
	}{
		{"short", "header of", []byte{0x0B, 0x50, 1}},
		{"magic", "magic", append([]byte("GET / HTTP/1.1\r\n"), make([]byte, 40)...)},
		{"unknown op", "unknown op", frame(Header{Op: 42}, "", nil)},
		{"op zero", "unknown op", frame(Header{Op: 0}, "", nil)},
		{"store without owner", "without an owner", frame(Header{Op: OpStore}, "", make([]byte, PageSize))},
		{"store partial page", "whole number", frame(Header{Op: OpStore}, "o", make([]byte, 100))},
		{"store empty", "whole number", frame(Header{Op: OpStore}, "o", nil)},
		{"unaligned", "not a multiple", frame(Header{Op: OpLoad, Offset: 1, Arg: PageSize}, "o", nil)},
		{"load too big", "load of", frame(Header{Op: OpLoad, Arg: MaxData + PageSize}, "o", nil)},
		{"load zero", "load of", frame(Header{Op: OpLoad}, "o", nil)},
		{"load with data", "bytes of data", frame(Header{Op: OpLoad, Arg: PageSize}, "o", make([]byte, PageSize))},
		{"hello with payload", "with a payload", frame(Header{Op: OpHello}, "o", nil)},
		{"drop huge", "drop of", frame(Header{Op: OpDrop, Arg: MaxDrop + PageSize}, "o", nil)},
		{"response with owner", "with an owner", frame(Header{Op: OpLoad | RespBit}, "o", nil)},
	} {
		_, _, err := ReadFrame(bytes.NewReader(tc.b), nil)
		if err == nil || (!errors.Is(err, ErrBadFrame) && !errors.Is(err, io.ErrUnexpectedEOF)) || !strings.Contains(err.Error(), tc.want) {
			if !(tc.name == "short" && errors.Is(err, io.ErrUnexpectedEOF)) {
				t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
			}
		}
	}
	// Oversized and owner-longer-than-payload headers.
	b := make([]byte, HeaderSize)
	(&Header{Op: OpStore, OwnerLen: 1, Length: MaxPayload + 1}).Put(b)
	if _, err := Parse(b); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Errorf("oversized: %v", err)
	}
	(&Header{Op: OpStore, OwnerLen: 9, Length: 3}).Put(b)
	if _, err := Parse(b); err == nil {
		t.Error("owner longer than payload accepted")
	}
	// Truncated payload.
	f := frame(Header{Op: OpStore}, "o", make([]byte, PageSize))
	if _, _, err := ReadFrame(bytes.NewReader(f[:len(f)-1]), nil); !errors.Is(err, io.ErrUnexpectedEOF) || !errors.Is(err, ErrBadFrame) {
		t.Errorf("truncated: %v", err)
	}
}

// FuzzReadFrame: any bytes decode to frames or a clean error, never a
// panic or an allocation beyond MaxPayload, and a decoded frame encodes
// back to the same bytes.
func FuzzReadFrame(f *testing.F) {
	f.Add(AppendFrame(nil, Header{Op: OpHello, ID: 1, Arg: 5}, "", nil))
	f.Add(AppendFrame(nil, Header{Op: OpStore, ID: 2, Region: 1, Offset: PageSize}, "n1/1", make([]byte, PageSize)))
	f.Add(AppendFrame(nil, Header{Op: OpLoad, ID: 3, Arg: PageSize}, "n1/1", nil))
	f.Add(AppendFrame(nil, Header{Op: OpDrop | RespBit, ID: 3}, "", []byte("x")))
	f.Add([]byte("\x0bP\x02\x01\xff\xff\xff\xff"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		var buf []byte
		for {
			h, p, err := ReadFrame(r, buf)
			if err != nil {
				return
			}
			if len(p) > MaxPayload || len(p) != int(h.Length) {
				t.Fatalf("payload of %d bytes for %+v", len(p), h)
			}
			again := AppendFrame(nil, h, string(p[:h.OwnerLen]), p[h.OwnerLen:])
			h2, p2, err := ReadFrame(bytes.NewReader(again), nil)
			if err != nil || h2 != h || !bytes.Equal(p, p2) {
				t.Fatalf("re-encoding %+v: %+v %v", h, h2, err)
			}
			buf = p[:0]
		}
	})
}
