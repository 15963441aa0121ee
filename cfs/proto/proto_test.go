package proto

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

// messages lists one value of every message type, for round trips and as
// fuzz seeds.
func messages() []Msg {
	ts := Timespec{Sec: 1700000000, Nsec: 123}
	attr := Attr{Dev: 2049, Ino: 7, Size: 1 << 40, Blocks: 9, Atime: ts, Mtime: ts, Ctime: ts, Mode: 0o100644, Nlink: 1, UID: 1000, GID: 1000, Blksize: 4096}
	return []Msg{
		&Empty{},
		&ExportList{Exports: []ExportInfo{{Name: "scratch"}, {Name: "ro", ReadOnly: true}}},
		&PathReq{Export: "scratch", Path: "a/b"},
		&OpenReq{Export: "scratch", Path: "f", Flags: 0o2101, Mode: 0o644, Dev: 2049, Ino: 77, DirDev: 2049, DirIno: 2, Caller: Cred{UID: 1000, GID: 1000, Groups: []uint32{4, 27}}},
		&SymlinkReq{Export: "scratch", Path: "l", Target: "../x", Caller: Cred{UID: 1000, GID: 1000}, DirDev: 2049, DirIno: 2},
		&HandleReq{Handle: 42},
		&HandleReply{Handle: 42, Attr: attr, Dir: attr},
		&EntryReply{Attr: attr, Dir: attr},
		&IOReq{Handle: 1, Offset: 4096, Size: 10, Data: []byte("hello")},
		&Data{Data: []byte("bytes")},
		&Count{N: 5},
		&Attr{Ino: 3, Mode: 0o40755},
		&DirList{Dev: 2049, Entries: []DirEntry{{Name: "x", Mode: 0o100000, Ino: 1}, {Name: "dir", Mode: 0o40000, Ino: 2}}},
		&SetattrReq{Export: "e", Path: "p", Valid: SetMode | SetMtime, Mode: 0o600, Mtime: ts, Dev: 1, Ino: 2},
		&RenameReq{Export: "e", From: "a", To: "b/c", Flags: 1, Dev: 1, Ino: 2, ToDev: 1, ToIno: 3},
		&RemoveReq{Export: "e", Path: "a/b", Dev: 1, Ino: 2, Caller: Cred{UID: 5, GID: 6, Groups: []uint32{7}}},
		&LinkReq{Export: "e", From: "a", To: "b/c", Dev: 1, Ino: 2, DirDev: 1, DirIno: 3},
		&FallocateReq{Handle: 3, Offset: 4096, Length: 1 << 20, Mode: 1},
		&Statfs{Blocks: 10, Bfree: 5, Bavail: 4, Files: 100, Ffree: 50, Bsize: 4096, NameLen: 255, Frsize: 4096},
	}
}

func fresh(m Msg) Msg { return reflect.New(reflect.TypeOf(m).Elem()).Interface().(Msg) }

func TestFSRoundTrip(t *testing.T) {
	for _, m := range messages() {
		b := Marshal(m)
		got := fresh(m)
		if err := Unmarshal(b, got); err != nil {
			t.Fatalf("%T: %v", m, err)
		}
		if !bytes.Equal(Marshal(got), b) {
			t.Fatalf("%T: round trip differs: %+v vs %+v", m, got, m)
		}
		// Strict: any truncation fails, any trailing byte fails.
		for i := 0; i < len(b); i++ {
			if err := Unmarshal(b[:i], fresh(m)); err == nil {
				t.Fatalf("%T truncated to %d of %d bytes decoded", m, i, len(b))
			}
		}
		if err := Unmarshal(append(b, 0), fresh(m)); !errors.Is(err, ErrMalformed) {
			t.Fatalf("%T with a trailing byte: %v", m, err)
		}
	}
}

func TestFSFrames(t *testing.T) {
	var buf bytes.Buffer
	buf.Write(AppendFrame(nil, 7, OpRead, []byte("abc")))
	buf.Write(AppendFrame(nil, 8, OpRead|ReplyBit, Reply(0, &Data{Data: []byte("xyz")})))
	f, err := ReadFrame(&buf)
	if err != nil || f.ID != 7 || f.Op != OpRead || string(f.Payload) != "abc" {
		t.Fatalf("frame 1: %+v %v", f, err)
	}
	f, err = ReadFrame(&buf)
	if err != nil || f.ID != 8 || f.Op != OpRead|ReplyBit {
		t.Fatalf("frame 2: %+v %v", f, err)
	}
	var d Data
	if errno, err := ParseReply(f.Payload, &d); errno != 0 || err != nil || string(d.Data) != "xyz" {
		t.Fatalf("reply: %d %v %q", errno, err, d.Data)
	}
	big := AppendFrame(nil, 1, OpWrite, nil)
	big[0] = 0xff // claims a 4 GiB payload
	if _, err := ReadFrame(bytes.NewReader(big)); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("oversized frame: %v", err)
	}
	if errno, err := ParseReply(Reply(2, nil), nil); errno != 2 || err != nil {
		t.Fatalf("errno reply: %d %v", errno, err)
	}
	if _, err := ParseReply([]byte{0, 0, 0, 2, 9}, nil); err == nil {
		t.Fatal("errno reply with a body decoded")
	}
}

func TestFSLimits(t *testing.T) {
	long := make([]byte, MaxPath+1)
	for i := range long {
		long[i] = 'a'
	}
	if err := Unmarshal(Marshal(&PathReq{Export: "e", Path: string(long)}), &PathReq{}); err == nil {
		t.Fatal("over-long path decoded")
	}
	if err := Unmarshal(Marshal(&PathReq{Export: "e", Path: "a\x00b"}), &PathReq{}); err == nil {
		t.Fatal("path with NUL decoded")
	}
	// A list claiming 2^32-1 elements in a few bytes is refused before allocating.
	if err := Unmarshal([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}, &DirList{}); err == nil {
		t.Fatal("huge list decoded")
	}
	if err := Unmarshal(Marshal(&DirList{Entries: []DirEntry{{Name: ".."}}}), &DirList{}); err == nil {
		t.Fatal("entry named .. decoded")
	}
	if err := Unmarshal(Marshal(&IOReq{Size: MaxIO + 1}), &IOReq{}); err == nil {
		t.Fatal("oversized read decoded")
	}
}

func TestFSValidPath(t *testing.T) {
	for p, want := range map[string]bool{
		"": true, "a": true, "a/b/c": true, ".hidden": true, "a..b": true,
		"..": false, "a/../b": false, "/etc": false, "a//b": false, "a/": false, ".": false, "a/./b": false, "a\x00": false,
	} {
		if ValidPath(p) != want {
			t.Errorf("ValidPath(%q) = %v, want %v", p, !want, want)
		}
	}
}

// FuzzDecode feeds arbitrary bytes to every message decoder: none may
// panic or allocate beyond its input, and whatever decodes re-encodes to
// the same bytes (one encoding per value).
func FuzzFSDecode(f *testing.F) {
	msgs := messages()
	for i, m := range msgs {
		f.Add(uint8(i), Marshal(m))
	}
	f.Fuzz(func(t *testing.T, which uint8, b []byte) {
		m := fresh(msgs[int(which)%len(msgs)])
		if err := Unmarshal(b, m); err != nil {
			return
		}
		if got := Marshal(m); !bytes.Equal(got, b) {
			t.Fatalf("%T: decoded %x, re-encoded %x", m, b, got)
		}
	})
}

// FuzzFrame feeds arbitrary bytes to the frame and reply decoders.
func FuzzFSFrame(f *testing.F) {
	f.Add(AppendFrame(nil, 1, OpRead, Marshal(&IOReq{Handle: 1, Size: 10})))
	f.Add(AppendFrame(nil, 2, OpRead|ReplyBit, Reply(0, &Data{Data: []byte("x")})))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 2})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for {
			fr, err := ReadFrame(r)
			if err != nil {
				return
			}
			if len(fr.Payload) > MaxPayload {
				t.Fatalf("payload of %d bytes accepted", len(fr.Payload))
			}
			var d Data
			_, _ = ParseReply(fr.Payload, &d)
		}
	})
}
