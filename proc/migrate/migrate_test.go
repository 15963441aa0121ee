package migrate

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/onebox-project/onebox/internal/testenv"
	"github.com/onebox-project/onebox/proc/stream"
)

func TestParseTCPLine(t *testing.T) {
	inodes := map[string]bool{"4242": true}
	for _, tc := range []struct {
		line, want string
	}{
		{"   0: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1", "127.0.0.1:8080 -> 127.0.0.1:50000"},
		{"   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1", ""}, // listening
		{"   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 99 1", ""},   // not ours
		{"  sl  local_address rem_address   st tx_queue rx_queue", ""},
		{"", ""},
	} {
		if got := parseTCPLine(tc.line, inodes); got != tc.want {
			t.Errorf("parseTCPLine(%q) = %q, want %q", tc.line, got, tc.want)
		}
	}
}

func TestHexAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"0000000000000000FFFF00000100007F:0050": "[0000000000000000FFFF00000100007F]:80",
		"bogus":                                 "bogus",
	} {
		if got := hexAddr(in); got != want {
			t.Errorf("hexAddr(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParsePPID(t *testing.T) {
	for in, want := range map[string]int{
		"123 (sh) S 45 123 123 0 -1": 45,
		"7 (a) b) (c) R 1 7 7 0":     1,
		"no parenthesis":             0,
		"9 (x)":                      0,
	} {
		if got := parsePPID(in); got != want {
			t.Errorf("parsePPID(%q) = %d, want %d", in, got, want)
		}
	}
}

func TestFDReason(t *testing.T) {
	for link, bad := range map[string]bool{
		"/dev/null": false, "/dev/urandom": false, "/dev/pts/3": false, "pipe:[12]": false,
		"/tmp/file": false, "anon_inode:[userfaultfd]": true,
	} {
		if got := fdReason(link) != ""; got != bad {
			t.Errorf("fdReason(%q) refuses = %v, want %v", link, got, bad)
		}
	}
	if _, err := os.Stat("/dev/fuse"); err == nil && fdReason("/dev/fuse") == "" {
		t.Error("/dev/fuse allowed")
	}
}

func TestCheckSelf(t *testing.T) {
	// This test process holds no device or connection of its own making;
	// a userfaultfd it opens is refused.
	if why := Check(os.Getpid()); why != "" && !strings.Contains(why, "device") {
		t.Logf("this test process: %s", why)
	}
	fd, _, e := syscall.Syscall(323 /* userfaultfd */, syscall.O_CLOEXEC, 0, 0)
	if e != 0 {
		testenv.NeedNoError(t, e, "userfaultfd (root, CONFIG_USERFAULTFD)")
	}
	defer syscall.Close(int(fd))
	if why := Check(os.Getpid()); !strings.Contains(why, "userfaultfd") {
		t.Errorf("Check with a userfaultfd open = %q", why)
	}
}

func TestSpecValidate(t *testing.T) {
	good := Spec{GID: "g0123456789ab", Argv: []string{"sh"}, PID: 42, Stdio: [3]string{"pipe:[1]", "pipe:[2]", "pipe:[3]"}}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mod := range map[string]func(*Spec){
		"bad gid":   func(s *Spec) { s.GID = "x" },
		"gid path":  func(s *Spec) { s.GID = "g../../../etc" },
		"gid upper": func(s *Spec) { s.GID = "g0123456789AB" },
		"no argv":   func(s *Spec) { s.Argv = nil },
		"pid zero":  func(s *Spec) { s.PID = 0 },
		"empty key": func(s *Spec) { s.Stdio[1] = "" },
		"nul key":   func(s *Spec) { s.Stdio[1] = "a\x00b" },
	} {
		s := good
		mod(&s)
		if s.Validate() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestFilesRoundTrip sends a directory's files through a stream pipe and
// checks they arrive whole; a sink refuses more than its bound.
func TestFilesRoundTrip(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	big := make([]byte, 3<<20+17)
	for i := range big {
		big[i] = byte(i * 7)
	}
	files := map[string][]byte{"core-1.img": big, "empty.img": nil, "pstree.img": []byte("tree")}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(src, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(src, "dump.log"), []byte("log"), 0o600)
	a, b := pipePair()
	go func() { _, _ = SendFiles(stream.NewConn(a, nil), src) }()
	sink := &FileSink{Dir: dst, Max: 8 << 20}
	rc := stream.NewConn(b, nil)
	for {
		f, err := rc.Read()
		if err != nil {
			t.Fatal(err)
		}
		if f.Type == stream.FilesDone {
			break
		}
		if err := sink.Write(f.Payload); err != nil {
			t.Fatal(err)
		}
	}
	if err := sink.Close(); err != nil {
		t.Fatal(err)
	}
	for n, want := range files {
		got, err := os.ReadFile(filepath.Join(dst, n))
		if err != nil || string(got) != string(want) {
			t.Errorf("%s: %d bytes, %v; want %d", n, len(got), err, len(want))
		}
	}
	if _, err := os.Stat(filepath.Join(dst, "dump.log")); !errors.Is(err, os.ErrNotExist) {
		t.Error("the log was sent")
	}
	small := &FileSink{Dir: t.TempDir(), Max: 10}
	if err := small.Write(stream.AppendFile(nil, "x", make([]byte, 11))); err == nil {
		t.Error("sink took more than its bound")
	}
	small.Close()
}

// TestFileSinkOneFileOpen: the sink keeps one file open whatever the
// number of files, refuses a file that comes back after another, and
// refuses more than MaxFiles files.
func TestFileSinkOneFileOpen(t *testing.T) {
	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := fds()
	sink := &FileSink{Dir: t.TempDir()}
	defer sink.Close()
	for i := range 200 {
		if err := sink.Write(stream.AppendFile(nil, fmt.Sprintf("f%d.img", i), []byte("x"))); err != nil {
			t.Fatal(err)
		}
	}
	if n := fds() - before; n > 20 {
		t.Fatalf("%d more fds open after 200 files", n)
	}
	if err := sink.Write(stream.AppendFile(nil, "f0.img", []byte("y"))); err == nil {
		t.Error("a file came back after another and was appended to")
	}
	many := &FileSink{Dir: t.TempDir(), files: MaxFiles - 1}
	defer many.Close()
	if err := many.Write(stream.AppendFile(nil, "last", nil)); err != nil {
		t.Fatalf("file %d: %v", MaxFiles, err)
	}
	if err := many.Write(stream.AppendFile(nil, "one-more", nil)); err == nil {
		t.Errorf("sink took %d files", MaxFiles+1)
	}
}

// FuzzSpec: a Migrate frame from the network either fails to validate or
// names a process id that is safe as a file name.
func FuzzSpec(f *testing.F) {
	f.Add([]byte(`{"gid":"g0123456789ab","argv":["sh"],"pid":42,"stdio":["pipe:[1]","pipe:[2]","pipe:[3]"]}`))
	f.Add([]byte(`{"gid":"g../../../etc","argv":["sh"],"pid":1,"stdio":["a","b","c"]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var s Spec
		if json.Unmarshal(b, &s) != nil || s.Validate() != nil {
			return
		}
		if strings.ContainsAny(s.GID, "/.") || filepath.Base(s.GID) != s.GID {
			t.Fatalf("validated gid %q", s.GID)
		}
	})
}
