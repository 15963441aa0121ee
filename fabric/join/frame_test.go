package join_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"

	"github.com/onebox-project/onebox/fabric/join"
	"github.com/onebox-project/onebox/fabric/pki"
)

func frame(n uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, n)
	return append(b, payload...)
}

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	req := join.Request{Version: join.Version, Node: "n2", Secret: "s", CSR: []byte{1, 2, 3}, IPs: []string{"10.0.0.2"}}
	if err := join.WriteFrame(&buf, req); err != nil {
		t.Fatal(err)
	}
	if n := binary.BigEndian.Uint32(buf.Bytes()); int(n) != buf.Len()-4 {
		t.Fatalf("header says %d bytes, payload has %d", n, buf.Len()-4)
	}
	b, err := join.ReadFrame(&buf)
	if err != nil {
		t.Fatal(err)
	}
	got, err := join.DecodeRequest(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Node != req.Node || got.Secret != req.Secret || !bytes.Equal(got.CSR, req.CSR) || len(got.IPs) != 1 || got.IPs[0] != req.IPs[0] {
		t.Errorf("round trip = %+v, want %+v", got, req)
	}
	if buf.Len() != 0 {
		t.Errorf("ReadFrame left %d bytes unread", buf.Len())
	}
}

func TestWriteFrameTooLarge(t *testing.T) {
	var buf bytes.Buffer
	err := join.WriteFrame(&buf, join.Response{Error: strings.Repeat("x", join.MaxFrame)})
	if err == nil {
		t.Fatal("WriteFrame wrote a frame larger than MaxFrame")
	}
	if buf.Len() != 0 {
		t.Errorf("WriteFrame wrote %d bytes of a refused frame", buf.Len())
	}
}

func TestReadFrame(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		want    []byte // nil: an error
		errText string
	}{
		{"one byte", frame(1, []byte("x")), []byte("x"), ""},
		{"exactly MaxFrame", frame(join.MaxFrame, make([]byte, join.MaxFrame)), make([]byte, join.MaxFrame), ""},
		{"trailing data left", frame(2, []byte("ab+more")), []byte("ab"), ""},
		{"empty input", nil, nil, "header"},
		{"short header", []byte{0, 0, 1}, nil, "header"},
		{"zero length", frame(0, nil), nil, "out of range"},
		{"MaxFrame+1", frame(join.MaxFrame+1, make([]byte, join.MaxFrame+1)), nil, "out of range"},
		{"4 GiB", frame(0xFFFFFFFF, []byte("tiny")), nil, "out of range"},
		{"truncated payload", frame(10, []byte("abc")), nil, "truncated"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := join.ReadFrame(bytes.NewReader(tt.in))
			if tt.want == nil {
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("ReadFrame = %d bytes, %v; want an error mentioning %q", len(got), err, tt.errText)
				}
				return
			}
			if err != nil || !bytes.Equal(got, tt.want) {
				t.Fatalf("ReadFrame = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestReadFrameHugeHeaderReadsNothingMore(t *testing.T) {
	r := bytes.NewReader(frame(0xFFFFFFFF, bytes.Repeat([]byte("x"), 1000)))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err := join.ReadFrame(r)
	runtime.ReadMemStats(&after)
	if err == nil {
		t.Fatal("ReadFrame accepted a 4 GiB frame")
	}
	if r.Len() != 1000 {
		t.Errorf("ReadFrame consumed %d payload bytes of a refused frame", 1000-r.Len())
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > join.MaxFrame {
		t.Errorf("ReadFrame allocated %d bytes for a refused frame", alloc)
	}
}

func FuzzReadFrame(f *testing.F) {
	f.Add(frame(3, []byte("abc")))
	f.Add(frame(0, nil))
	f.Add(frame(0xFFFFFFFF, []byte("x")))
	f.Add(frame(join.MaxFrame+1, nil))
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		b, err := join.ReadFrame(r)
		consumed := len(data) - r.Len()
		if err != nil {
			if b != nil {
				t.Fatalf("ReadFrame returned %d bytes with error %v", len(b), err)
			}
			if len(data) >= 4 {
				if n := binary.BigEndian.Uint32(data); (n == 0 || n > join.MaxFrame) && consumed != 4 {
					t.Fatalf("refused header %d, but %d bytes were read", n, consumed)
				}
			}
			return
		}
		n := binary.BigEndian.Uint32(data)
		if n == 0 || n > join.MaxFrame {
			t.Fatalf("accepted frame length %d", n)
		}
		if len(b) != int(n) || consumed != 4+int(n) || !bytes.Equal(b, data[4:4+n]) {
			t.Fatalf("header %d: got %d bytes, consumed %d", n, len(b), consumed)
		}
	})
}

func validRequest() map[string]any {
	return map[string]any{"version": 1, "node": "n2", "secret": "s", "csr": []byte{1}, "ips": []string{"10.0.0.2", "fd00::2"}}
}

func TestDecodeRequest(t *testing.T) {
	with := func(k string, v any) []byte {
		m := validRequest()
		if v == nil {
			delete(m, k)
		} else {
			m[k] = v
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ips := func(n int) []string {
		var out []string
		for i := range n {
			out = append(out, fmt.Sprintf("10.0.%d.%d", i/256, i%256))
		}
		return out
	}
	tests := []struct {
		name    string
		in      []byte
		ok      bool
		errText string
	}{
		{"valid", with("version", 1), true, ""},
		{"no IPs", with("ips", nil), true, ""},
		{"64 IPs", with("ips", ips(64)), true, ""},
		{"unknown field ignored", with("future", "x"), true, ""},
		{"version 0", with("version", 0), false, "version"},
		{"version 2", with("version", 2), false, "version"},
		{"version missing", with("version", nil), false, "version"},
		{"version as string", with("version", "1"), false, "malformed"},
		{"empty name", with("node", ""), false, "node name"},
		{"name with space", with("node", "a b"), false, "node name"},
		{"name with slash", with("node", "../x"), false, "node name"},
		{"name too long", with("node", strings.Repeat("a", 64)), false, "node name"},
		{"CSR missing", with("csr", nil), false, "certificate request"},
		{"CSR empty", with("csr", []byte{}), false, "certificate request"},
		{"CSR not base64", with("csr", "!!!"), false, "malformed"},
		{"bad IP", with("ips", []string{"10.0.0.256"}), false, "bad IP"},
		{"host name as IP", with("ips", []string{"example.com"}), false, "bad IP"},
		{"empty IP", with("ips", []string{""}), false, "bad IP"},
		{"CIDR as IP", with("ips", []string{"10.0.0.0/8"}), false, "bad IP"},
		{"65 IPs", with("ips", ips(65)), false, "too many"},
		{"IPs not a list", with("ips", "10.0.0.1"), false, "malformed"},
		{"garbage", []byte("garbage"), false, "malformed"},
		{"truncated JSON", []byte(`{"version":1,`), false, "malformed"},
		{"JSON array", []byte(`[1]`), false, "malformed"},
		{"JSON null", []byte(`null`), false, "version"},
		{"empty", nil, false, "malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := join.DecodeRequest(tt.in)
			if tt.ok {
				if err != nil {
					t.Fatalf("DecodeRequest(%s): %v", tt.in, err)
				}
				if req.Node != "n2" || req.Version != join.Version || len(req.CSR) == 0 {
					t.Errorf("DecodeRequest(%s) = %+v", tt.in, req)
				}
				return
			}
			if err == nil {
				t.Fatalf("DecodeRequest(%s) accepted: %+v", tt.in, req)
			}
			if !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("error %q does not mention %q", err, tt.errText)
			}
		})
	}
}

func FuzzDecodeRequest(f *testing.F) {
	seed, _ := json.Marshal(validRequest())
	f.Add(seed)
	f.Add([]byte(`{"version":1,"node":"a","csr":"AA==","ips":["::1"]}`))
	f.Add([]byte(`{"version":1,"node":"-","csr":""}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := join.DecodeRequest(data)
		if err != nil {
			return
		}
		if req.Version != join.Version {
			t.Fatalf("accepted version %d", req.Version)
		}
		if pki.ValidNodeName(req.Node) != nil {
			t.Fatalf("accepted node name %q", req.Node)
		}
		if len(req.CSR) == 0 {
			t.Fatal("accepted a request without CSR")
		}
		if len(req.IPs) > 64 {
			t.Fatalf("accepted %d IPs", len(req.IPs))
		}
		for _, s := range req.IPs {
			if net.ParseIP(s) == nil {
				t.Fatalf("accepted IP %q", s)
			}
		}
		// What the server accepted must survive being re-encoded.
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := join.DecodeRequest(b); err != nil {
			t.Fatalf("re-encoded request refused: %v", err)
		}
	})
}
