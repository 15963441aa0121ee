package wire

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestRequestRoundTrip(t *testing.T) {
	for _, r := range []Request{
		{Kind: KindConnect, Port: 8000},
		{Kind: KindCheck, Port: 65535, GID: "g0123456789ab"},
		{Kind: KindConnect, Port: 1, GID: strings.Repeat("x", MaxGID)},
		{Kind: KindSession},
	} {
		b, err := AppendRequest(nil, r)
		if err != nil {
			t.Fatalf("%+v: %v", r, err)
		}
		// Payload after the header must stay unread.
		rd := bytes.NewReader(append(b, "payload"...))
		got, err := ReadRequest(rd)
		if err != nil || got != r {
			t.Fatalf("round trip %+v: got %+v, %v", r, got, err)
		}
		if rd.Len() != len("payload") {
			t.Fatalf("%+v: decoder read %d payload bytes", r, len("payload")-rd.Len())
		}
	}
}

func TestRequestRejects(t *testing.T) {
	good, _ := AppendRequest(nil, Request{Kind: KindConnect, Port: 80, GID: "g1"})
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	for name, b := range map[string][]byte{
		"empty":        nil,
		"short":        good[:5],
		"magic":        mut(func(b []byte) []byte { b[0] = 'X'; return b }),
		"version 1":    mut(func(b []byte) []byte { b[4] = 1; return b }),
		"version 3":    mut(func(b []byte) []byte { b[4] = 3; return b }),
		"session port": mut(func(b []byte) []byte { b[5] = byte(KindSession); return b }),
		"kind":         mut(func(b []byte) []byte { b[5] = 9; return b }),
		"port zero":    mut(func(b []byte) []byte { b[6], b[7] = 0, 0; return b }),
		"gid too big":  mut(func(b []byte) []byte { b[8] = MaxGID + 1; return b }),
		"gid cut":      good[:len(good)-1],
		"gid space":    mut(func(b []byte) []byte { b[9] = ' '; return b }),
	} {
		if _, err := ReadRequest(bytes.NewReader(b)); !errors.Is(err, ErrBadHeader) {
			t.Errorf("%s: err = %v, want ErrBadHeader", name, err)
		}
	}
	if _, err := AppendRequest(nil, Request{Kind: KindCheck}); err == nil {
		t.Error("port 0 encoded")
	}
	if _, err := AppendRequest(nil, Request{Kind: KindSession, Port: 80}); err == nil {
		t.Error("session with a port encoded")
	}
}

func TestReplyRoundTrip(t *testing.T) {
	long := strings.Repeat("é", MaxMessage) // 2 bytes a rune: cut at a rune boundary
	for _, r := range []Reply{{}, {Status: StatusRefused, Message: "nothing listens on 127.0.0.1:8000"}, {Status: StatusBad, Message: long}} {
		b := AppendReply(nil, r)
		got, err := ReadReply(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		if got.Status != r.Status || !strings.HasPrefix(r.Message, got.Message) || len(got.Message) > MaxMessage {
			t.Fatalf("round trip %v: got %v (%d bytes)", r.Status, got.Status, len(got.Message))
		}
		if (got.Err() == nil) != (r.Status == StatusOK) {
			t.Fatalf("Err of %v: %v", r.Status, got.Err())
		}
	}
}

// FuzzReadRequest: no input makes the decoder panic, accept an invalid
// header, or read past the header; what it accepts re-encodes to the
// same bytes.
func FuzzReadRequest(f *testing.F) {
	for _, r := range []Request{{Kind: KindConnect, Port: 8000}, {Kind: KindCheck, Port: 443, GID: "g0123456789ab"}} {
		b, _ := AppendRequest(nil, r)
		f.Add(b)
	}
	f.Add([]byte("OBSV\x01\x01\x00\x00\x00"))
	f.Add([]byte("OBSV\x02\x03\x00\x00\x00"))
	f.Add([]byte("OBSV\x02\x03\x00\x01\x00"))
	f.Add([]byte("OBSV\x02\x02\x1f\x40\xff"))
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		rd := bytes.NewReader(b)
		r, err := ReadRequest(rd)
		if err != nil {
			return
		}
		if r.Validate() != nil {
			t.Fatalf("accepted invalid %+v", r)
		}
		enc, err := AppendRequest(nil, r)
		if err != nil {
			t.Fatal(err)
		}
		if used := len(b) - rd.Len(); !bytes.Equal(enc, b[:used]) {
			t.Fatalf("re-encoding %+v: %q, consumed %q", r, enc, b[:used])
		}
	})
}

// FuzzReadReply: no input makes the reply decoder panic or return a
// message that is too long or not UTF-8.
func FuzzReadReply(f *testing.F) {
	f.Add(AppendReply(nil, Reply{}))
	f.Add(AppendReply(nil, Reply{Status: StatusNoProcess, Message: "no process g0123456789ab here"}))
	f.Add([]byte{0, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ReadReply(bytes.NewReader(b))
		if err != nil {
			return
		}
		if len(r.Message) > MaxMessage {
			t.Fatalf("message of %d bytes", len(r.Message))
		}
		if !bytes.Equal(AppendReply(nil, r), b[:3+len(r.Message)]) {
			t.Fatal("re-encoding differs")
		}
	})
}
