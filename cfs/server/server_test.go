package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/cfs/proto"
	"github.com/onebox-project/onebox/cfs/server"
	"github.com/onebox-project/onebox/fabric/pki"
)

// setup serves a read-write export "rw" and a read-only export "ro" over
// in-memory connections.
func setup(t *testing.T) (c *client.Client, rw, ro string) {
	t.Helper()
	rw, ro = t.TempDir(), t.TempDir()
	return serve(t, server.Export{Name: "rw", Path: rw}, server.Export{Name: "ro", Path: ro, ReadOnly: true}), rw, ro
}

// serve serves exps over in-memory connections until the test ends.
func serve(t *testing.T, exps ...server.Export) *client.Client {
	t.Helper()
	s, err := server.New(exps, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	c := client.New(func(context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go s.ServeConn(b)
		return a, nil
	}, 0)
	t.Cleanup(func() { c.Close(); s.Close() })
	return c
}

func call(t *testing.T, c *client.Client, op proto.Op, req, resp proto.Msg) syscall.Errno {
	t.Helper()
	_, errno := c.Call(context.Background(), op, req, resp)
	return errno
}

func TestFSExportsAndReadWrite(t *testing.T) {
	c, rw, _ := setup(t)
	var l proto.ExportList
	if e := call(t, c, proto.OpExports, &proto.Empty{}, &l); e != 0 || len(l.Exports) != 2 || l.Exports[0].Name != "ro" || !l.Exports[0].ReadOnly {
		t.Fatalf("exports: %v %+v", e, l)
	}
	var hr proto.HandleReply
	if e := call(t, c, proto.OpCreate, &proto.OpenReq{Export: "rw", Path: "f", Flags: syscall.O_RDWR, Mode: 0o640}, &hr); e != 0 {
		t.Fatal(e)
	}
	if hr.Attr.Mode != syscall.S_IFREG|0o640 {
		t.Fatalf("created with mode %o", hr.Attr.Mode)
	}
	var n proto.Count
	if e := call(t, c, proto.OpWrite, &proto.IOReq{Handle: hr.Handle, Offset: 3, Data: []byte("abc")}, &n); e != 0 || n.N != 3 {
		t.Fatal(e, n)
	}
	var d proto.Data
	if e := call(t, c, proto.OpRead, &proto.IOReq{Handle: hr.Handle, Offset: 0, Size: 100}, &d); e != 0 || !bytes.Equal(d.Data, []byte("\x00\x00\x00abc")) {
		t.Fatalf("read: %v %q", e, d.Data)
	}
	if e := call(t, c, proto.OpClose, &proto.HandleReq{Handle: hr.Handle}, nil); e != 0 {
		t.Fatal(e)
	}
	if e := call(t, c, proto.OpRead, &proto.IOReq{Handle: hr.Handle, Size: 1}, &d); e != syscall.EBADF {
		t.Fatalf("read of a closed handle: %v, want EBADF", e)
	}
	if b, _ := os.ReadFile(filepath.Join(rw, "f")); string(b) != "\x00\x00\x00abc" {
		t.Fatalf("on disk: %q", b)
	}
}

func TestFSNoEscape(t *testing.T) {
	c, rw, _ := setup(t)
	outside := t.TempDir()
	os.WriteFile(filepath.Join(outside, "secret"), []byte("s"), 0o644)
	os.Symlink(outside, filepath.Join(rw, "out"))
	os.Symlink("../"+filepath.Base(outside), filepath.Join(rw, "rel-out"))
	os.Symlink("/proc/self/root/etc", filepath.Join(rw, "magic"))
	os.Mkdir(filepath.Join(rw, "d"), 0o755)
	os.Symlink("../d", filepath.Join(rw, "d", "in"))
	var a proto.Attr
	for _, p := range []string{"..", "../x", "d/../../x", "/etc/passwd", "out/secret", "out", "rel-out", "magic/passwd"} {
		// The links themselves are shown (as links), never followed.
		if e := call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: p}, &a); p == "out" || p == "rel-out" {
			if e != 0 || a.Mode&syscall.S_IFMT != syscall.S_IFLNK {
				t.Errorf("getattr of the link %q: %v, mode %o, want a symlink", p, e, a.Mode)
			}
		} else if e != syscall.EACCES {
			t.Errorf("getattr %q: %v, want EACCES", p, e)
		}
		var hr proto.HandleReply
		if e := call(t, c, proto.OpCreate, &proto.OpenReq{Export: "rw", Path: p + "/new", Flags: syscall.O_WRONLY, Mode: 0o644}, &hr); e != syscall.EACCES {
			t.Errorf("create under %q: %v, want EACCES", p, e)
		}
		if e := call(t, c, proto.OpUnlink, &proto.RemoveReq{Export: "rw", Path: p + "/secret"}, &proto.Attr{}); e != syscall.EACCES {
			t.Errorf("unlink under %q: %v, want EACCES", p, e)
		}
	}
	if e := call(t, c, proto.OpRename, &proto.RenameReq{Export: "rw", From: "d", To: "out/d"}, nil); e != syscall.EACCES {
		t.Errorf("rename out of the export: %v, want EACCES", e)
	}
	if e := call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "rw", Path: "out/secret", Valid: proto.SetMode, Mode: 0o777}, &a); e != syscall.EACCES {
		t.Errorf("chmod through a symlink out: %v, want EACCES", e)
	}
	if _, err := os.Stat(filepath.Join(outside, "secret")); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(filepath.Join(outside, "secret")); st.Mode().Perm() != 0o644 {
		t.Fatal("mode of a file outside the export changed")
	}
	// Inside is fine, including through a symlink that stays inside
	// (not the last component).
	if e := call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: "d/in/in"}, &a); e != 0 || a.Mode&syscall.S_IFMT != syscall.S_IFLNK {
		t.Errorf("getattr through an inside symlink: %v %o", e, a.Mode)
	}
	for _, p := range []string{"out", "magic"} {
		var hr proto.HandleReply
		if e := call(t, c, proto.OpOpen, &proto.OpenReq{Export: "rw", Path: p}, &hr); e != syscall.ELOOP {
			t.Errorf("open of the symlink %q: %v, want ELOOP", p, e)
		}
		if e := call(t, c, proto.OpOpendir, &proto.PathReq{Export: "rw", Path: p}, &hr); e == 0 {
			t.Errorf("opendir of the symlink %q succeeded", p)
		}
		if e := call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "rw", Path: p, Valid: proto.SetSize}, &a); e != syscall.EINVAL {
			t.Errorf("truncate of the symlink %q: %v, want EINVAL", p, e)
		}
	}
	if e := call(t, c, proto.OpGetattr, &proto.PathReq{Export: "nope"}, &a); e != syscall.ENOENT {
		t.Errorf("unknown export: %v, want ENOENT", e)
	}
}

func TestFSReadOnly(t *testing.T) {
	c, _, ro := setup(t)
	os.WriteFile(filepath.Join(ro, "f"), []byte("x"), 0o644)
	var hr proto.HandleReply
	var a proto.Attr
	for name, e := range map[string]syscall.Errno{
		"create":   call(t, c, proto.OpCreate, &proto.OpenReq{Export: "ro", Path: "g", Flags: syscall.O_WRONLY, Mode: 0o644}, &hr),
		"open rw":  call(t, c, proto.OpOpen, &proto.OpenReq{Export: "ro", Path: "f", Flags: syscall.O_RDWR}, &hr),
		"trunc":    call(t, c, proto.OpOpen, &proto.OpenReq{Export: "ro", Path: "f", Flags: syscall.O_RDONLY | syscall.O_TRUNC}, &hr),
		"mkdir":    call(t, c, proto.OpMkdir, &proto.OpenReq{Export: "ro", Path: "d", Mode: 0o755}, &a),
		"unlink":   call(t, c, proto.OpUnlink, &proto.RemoveReq{Export: "ro", Path: "f"}, &proto.Attr{}),
		"rmdir":    call(t, c, proto.OpRmdir, &proto.RemoveReq{Export: "ro", Path: "f"}, &proto.Attr{}),
		"rename":   call(t, c, proto.OpRename, &proto.RenameReq{Export: "ro", From: "f", To: "g"}, nil),
		"setattr":  call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "ro", Path: "f", Valid: proto.SetSize}, &a),
		"utimens":  call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "ro", Path: "f", Valid: proto.SetMtimeNow}, &a),
		"chmodAll": call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "ro", Path: "", Valid: proto.SetMode, Mode: 0o777}, &a),
	} {
		if e != syscall.EROFS {
			t.Errorf("%s on a read-only export: %v, want EROFS", name, e)
		}
	}
	if e := call(t, c, proto.OpOpen, &proto.OpenReq{Export: "ro", Path: "f", Flags: syscall.O_RDONLY}, &hr); e != 0 {
		t.Fatalf("read-only open: %v", e)
	}
	if e := call(t, c, proto.OpWrite, &proto.IOReq{Handle: hr.Handle, Data: []byte("y")}, &proto.Count{}); e != syscall.EROFS {
		t.Errorf("write on a read-only export: %v", e)
	}
}

func TestFSReaddirMany(t *testing.T) {
	c, rw, _ := setup(t)
	const n = 5000
	for i := range n {
		os.WriteFile(filepath.Join(rw, fmt.Sprintf("file-%06d-with-a-long-name-to-fill-batches", i)), nil, 0o644)
	}
	var hr proto.HandleReply
	if e := call(t, c, proto.OpOpendir, &proto.PathReq{Export: "rw"}, &hr); e != 0 {
		t.Fatal(e)
	}
	seen, batches := map[string]bool{}, 0
	for {
		var l proto.DirList
		if e := call(t, c, proto.OpReaddir, &proto.HandleReq{Handle: hr.Handle}, &l); e != 0 {
			t.Fatal(e)
		}
		if len(l.Entries) == 0 {
			break
		}
		batches++
		for _, x := range l.Entries {
			if seen[x.Name] {
				t.Fatalf("%s listed twice", x.Name)
			}
			seen[x.Name] = true
		}
	}
	if len(seen) != n || batches < 2 {
		t.Fatalf("%d entries in %d batches, want %d in several", len(seen), batches, n)
	}
}

func TestFSConcurrentRequests(t *testing.T) {
	c, rw, _ := setup(t)
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	os.WriteFile(filepath.Join(rw, "big"), data, 0o644)
	var hr proto.HandleReply
	if e := call(t, c, proto.OpOpen, &proto.OpenReq{Export: "rw", Path: "big"}, &hr); e != 0 {
		t.Fatal(e)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := i * 16 << 10
			var d proto.Data
			if _, e := c.Call(context.Background(), proto.OpRead, &proto.IOReq{Handle: hr.Handle, Offset: uint64(off), Size: 16 << 10}, &d); e != 0 {
				errs <- e
				return
			}
			if !bytes.Equal(d.Data, data[off:off+16<<10]) {
				errs <- fmt.Errorf("read at %d: wrong bytes", off)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// A malformed request gets EINVAL and the connection goes on; an unknown
// op gets ENOSYS; an oversized frame ends the connection.
func TestFSMalformedRequests(t *testing.T) {
	s, err := server.New([]server.Export{{Name: "rw", Path: t.TempDir()}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	a, b := net.Pipe()
	go s.ServeConn(b)
	defer a.Close()
	roundTrip := func(op proto.Op, payload []byte) uint32 {
		t.Helper()
		go a.Write(proto.AppendFrame(nil, 9, op, payload))
		f, err := proto.ReadFrame(a)
		if err != nil || f.ID != 9 || f.Op != op|proto.ReplyBit {
			t.Fatalf("reply: %+v %v", f, err)
		}
		errno, _ := proto.ParseReply(f.Payload, nil)
		return errno
	}
	if e := roundTrip(proto.OpGetattr, []byte{1, 2, 3}); e != uint32(syscall.EINVAL) {
		t.Fatalf("truncated request: errno %d", e)
	}
	if e := roundTrip(proto.Op(99), nil); e != uint32(syscall.ENOSYS) {
		t.Fatalf("unknown op: errno %d", e)
	}
	big := proto.AppendHeader(nil, 1, proto.OpWrite, proto.MaxPayload+1)
	go a.Write(big)
	if _, err := proto.ReadFrame(a); err != io.EOF && err != io.ErrClosedPipe {
		t.Fatalf("after an oversized frame: %v, want the connection closed", err)
	}
}

// The fabric port must offer the protocol to members (pki.ServerTLS lists
// it by value, to keep pki free of capability packages).
func TestFSProtocolOnFabricPort(t *testing.T) {
	ca, err := pki.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := pki.ServerTLS(tls.Certificate{}, ca.Cert).GetConfigForClient(&tls.ClientHelloInfo{SupportedProtos: []string{proto.ALPN}})
	if err != nil || !slices.Contains(cfg.NextProtos, proto.ALPN) || cfg.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Fatalf("fabric port config for %s: protos %v, client auth %v, %v", proto.ALPN, cfg.NextProtos, cfg.ClientAuth, err)
	}
}

// Symlinks are shown as symlinks: getattr, readdir and readlink report
// the link, the server never follows the last component, and removing a
// link (rm -rf of a directory holding one) leaves its target alone.
func TestFSSymlinksShownAsLinks(t *testing.T) {
	c, rw, _ := setup(t)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Mkdir(filepath.Join(rw, "important"), 0o755))
	must(os.WriteFile(filepath.Join(rw, "important", "file"), []byte("keep"), 0o644))
	must(os.Mkdir(filepath.Join(rw, "data"), 0o755))
	must(os.Symlink("../important", filepath.Join(rw, "data", "link")))
	must(os.Symlink(".", filepath.Join(rw, "loop")))

	var a proto.Attr
	if e := call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: "loop"}, &a); e != 0 || a.Mode&syscall.S_IFMT != syscall.S_IFLNK {
		t.Fatalf("getattr of loop -> .: %v, mode %o, want a symlink", e, a.Mode)
	}
	var root proto.Attr
	call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw"}, &root)
	if a.Ino == root.Ino {
		t.Fatal("loop -> . has the inode number of the export root")
	}
	var d proto.Data
	if e := call(t, c, proto.OpReadlink, &proto.PathReq{Export: "rw", Path: "data/link"}, &d); e != 0 || string(d.Data) != "../important" {
		t.Fatalf("readlink: %v %q", e, d.Data)
	}
	if e := call(t, c, proto.OpReadlink, &proto.PathReq{Export: "rw", Path: "important/file"}, &d); e != syscall.EINVAL {
		t.Fatalf("readlink of a file: %v, want EINVAL", e)
	}
	var hr proto.HandleReply
	if e := call(t, c, proto.OpOpendir, &proto.PathReq{Export: "rw", Path: "data"}, &hr); e != 0 {
		t.Fatal(e)
	}
	var l proto.DirList
	if e := call(t, c, proto.OpReaddir, &proto.HandleReq{Handle: hr.Handle}, &l); e != 0 || len(l.Entries) != 1 || l.Entries[0].Mode != syscall.S_IFLNK {
		t.Fatalf("readdir of data: %v %+v, want one symlink", e, l.Entries)
	}
	// rm -rf data: what rm sees is a link; unlinking it keeps the target.
	if e := call(t, c, proto.OpRmdir, &proto.RemoveReq{Export: "rw", Path: "data/link"}, &proto.Attr{}); e != syscall.ENOTDIR {
		t.Fatalf("rmdir of a link: %v, want ENOTDIR", e)
	}
	if e := call(t, c, proto.OpUnlink, &proto.RemoveReq{Export: "rw", Path: "data/link"}, &proto.Attr{}); e != 0 {
		t.Fatal(e)
	}
	if e := call(t, c, proto.OpRmdir, &proto.RemoveReq{Export: "rw", Path: "data"}, &proto.Attr{}); e != 0 {
		t.Fatal(e)
	}
	if b, err := os.ReadFile(filepath.Join(rw, "important", "file")); err != nil || string(b) != "keep" {
		t.Fatalf("target of the removed link: %q %v", b, err)
	}

	// Symlink stores the target as a string, whatever it names.
	for _, target := range []string{"important/file", "/etc/passwd", "../../x"} {
		name := "made-" + strings.ReplaceAll(target, "/", "_")
		if e := call(t, c, proto.OpSymlink, &proto.SymlinkReq{Export: "rw", Path: name, Target: target}, &a); e != 0 || a.Mode&syscall.S_IFMT != syscall.S_IFLNK {
			t.Fatalf("symlink %s -> %s: %v, mode %o", name, target, e, a.Mode)
		}
		if got, err := os.Readlink(filepath.Join(rw, name)); err != nil || got != target {
			t.Fatalf("on disk %s -> %q %v, want %q", name, got, err, target)
		}
	}
	if e := call(t, c, proto.OpSymlink, &proto.SymlinkReq{Export: "ro", Path: "l", Target: "x"}, &a); e != syscall.EROFS {
		t.Fatalf("symlink in a read-only export: %v, want EROFS", e)
	}
	if e := call(t, c, proto.OpSymlink, &proto.SymlinkReq{Export: "rw", Path: "out/l", Target: "x"}, &a); e != syscall.ENOENT {
		t.Fatalf("symlink under a missing directory: %v, want ENOENT", e)
	}
}

// FIFOs, sockets and devices are never opened (a FIFO's open would block
// a server goroutine, and Close with it): ENXIO at once, and Close ends.
func TestFSSpecialFilesRefused(t *testing.T) {
	for _, fl := range []uint32{syscall.O_RDONLY, syscall.O_WRONLY, syscall.O_RDWR} {
		for _, op := range []proto.Op{proto.OpOpen, proto.OpCreate} {
			rw := t.TempDir()
			s, err := server.New([]server.Export{{Name: "rw", Path: rw}}, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			c := client.New(func(context.Context) (net.Conn, error) {
				a, b := net.Pipe()
				go s.ServeConn(b)
				return a, nil
			}, time.Second)
			if err := syscall.Mkfifo(filepath.Join(rw, "fifo"), 0o666); err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("unix", filepath.Join(rw, "sock"))
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{"sock", "fifo"} {
				var hr proto.HandleReply
				if e := call(t, c, op, &proto.OpenReq{Export: "rw", Path: p, Flags: fl, Mode: 0o644}, &hr); e != syscall.ENXIO {
					t.Errorf("%v %s flags %d: %v, want ENXIO", op, p, fl, e)
				}
			}
			done := make(chan struct{})
			go func() { s.Close(); close(done) }()
			select {
			case <-done:
			case <-time.After(server.CloseTimeout + 5*time.Second):
				t.Fatal("Server.Close did not return")
			}
			c.Close()
			ln.Close()
		}
	}
}

// A handle is valid only with the export it was opened in: a setattr
// naming a read-write export with a bad path and the handle of a file
// open in a read-only export must not change the file.
func TestFSSetattrHandleExport(t *testing.T) {
	c, _, ro := setup(t)
	f := filepath.Join(ro, "f")
	if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	var hr proto.HandleReply
	if e := call(t, c, proto.OpOpen, &proto.OpenReq{Export: "ro", Path: "f"}, &hr); e != 0 {
		t.Fatal(e)
	}
	var a proto.Attr
	for _, r := range []proto.SetattrReq{
		{Export: "rw", Path: "nope", Handle: hr.Handle, Valid: proto.SetMode, Mode: 0o777},
		{Export: "rw", Path: "", Handle: hr.Handle, Valid: proto.SetMode, Mode: 0o777},
		{Export: "rw", Path: "", Handle: hr.Handle, Valid: proto.SetMtimeNow},
		{Export: "ro", Path: "", Handle: hr.Handle, Valid: proto.SetMode, Mode: 0o777},
		{Export: "ro", Path: "f", Handle: hr.Handle, Valid: proto.SetMode, Mode: 0o777},
	} {
		if e := call(t, c, proto.OpSetattr, &r, &a); e == 0 {
			t.Errorf("setattr %+v succeeded", r)
		}
	}
	if st, err := os.Stat(f); err != nil || st.Mode().Perm() != 0o644 {
		t.Fatalf("read-only file's mode: %v %v", st.Mode(), err)
	}
}

// A setattr with a handle acts on the handle's file, even unlinked, and
// never on the export's root; a path naming another file than the one
// the client checked (Dev, Ino) is ESTALE.
func TestFSSetattrHandleAndIdentity(t *testing.T) {
	c, rw, _ := setup(t)
	if err := os.Chmod(rw, 0o755); err != nil {
		t.Fatal(err)
	}
	var hr proto.HandleReply
	if e := call(t, c, proto.OpCreate, &proto.OpenReq{Export: "rw", Path: "f", Flags: syscall.O_RDWR, Mode: 0o644}, &hr); e != 0 {
		t.Fatal(e)
	}
	if e := call(t, c, proto.OpUnlink, &proto.RemoveReq{Export: "rw", Path: "f"}, &proto.Attr{}); e != 0 {
		t.Fatal(e)
	}
	var a proto.Attr
	if e := call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "rw", Handle: hr.Handle, Valid: proto.SetMode | proto.SetSize, Mode: 0o600, Size: 7}, &a); e != 0 ||
		a.Mode != syscall.S_IFREG|0o600 || a.Size != 7 || a.Ino != hr.Attr.Ino {
		t.Fatalf("setattr of an unlinked open file: %v %+v", e, a)
	}
	if st, _ := os.Stat(rw); st.Mode().Perm() != 0o755 {
		t.Fatalf("export root's mode changed to %v", st.Mode())
	}

	// Identity: the client checked "g" when it was one file; it is now
	// another (a symlink, or a file swapped in by rename).
	g := filepath.Join(rw, "g")
	os.WriteFile(g, []byte("old"), 0o644)
	var old proto.Attr
	call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: "g"}, &old)
	os.WriteFile(filepath.Join(rw, "secret"), []byte("secret"), 0o600)
	os.Remove(g)
	os.Link(filepath.Join(rw, "secret"), g)
	if e := call(t, c, proto.OpOpen, &proto.OpenReq{Export: "rw", Path: "g", Flags: syscall.O_RDONLY, Dev: old.Dev, Ino: old.Ino}, &hr); e != syscall.ESTALE {
		t.Errorf("open of a swapped file: %v, want ESTALE", e)
	}
	for _, r := range []proto.SetattrReq{
		{Export: "rw", Path: "g", Valid: proto.SetMode, Mode: 0o666, Dev: old.Dev, Ino: old.Ino},
		{Export: "rw", Path: "g", Valid: proto.SetSize, Dev: old.Dev, Ino: old.Ino},
	} {
		if e := call(t, c, proto.OpSetattr, &r, &a); e != syscall.ESTALE {
			t.Errorf("setattr %+v of a swapped file: %v, want ESTALE", r, e)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(rw, "secret")); string(b) != "secret" {
		t.Fatalf("swapped-in file changed: %q", b)
	}
	if st, _ := os.Stat(filepath.Join(rw, "secret")); st.Mode().Perm() != 0o600 {
		t.Fatalf("swapped-in file's mode changed: %v", st.Mode())
	}
	var cur proto.Attr
	call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: "g"}, &cur)
	if e := call(t, c, proto.OpOpen, &proto.OpenReq{Export: "rw", Path: "g", Flags: syscall.O_RDONLY, Dev: cur.Dev, Ino: cur.Ino}, &hr); e != 0 {
		t.Errorf("open with the current identity: %v", e)
	}
}

// A create that finds a file there (it appeared after the client's
// kernel saw none) opens it only if the caller may.
func TestFSCreateOverExistingChecked(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the check applies to a server running as root")
	}
	c, rw, _ := setup(t)
	if err := os.WriteFile(filepath.Join(rw, "secret"), []byte("s"), 0o600); err != nil {
		t.Fatal(err)
	}
	var hr proto.HandleReply
	if e := call(t, c, proto.OpCreate, &proto.OpenReq{Export: "rw", Path: "secret", Flags: syscall.O_RDWR | syscall.O_TRUNC, Mode: 0o644, Caller: proto.Cred{UID: 1000, GID: 1000}}, &hr); e != syscall.EACCES {
		t.Fatalf("create over a root-only file by uid 1000: %v, want EACCES", e)
	}
	if b, _ := os.ReadFile(filepath.Join(rw, "secret")); string(b) != "s" {
		t.Fatalf("root-only file truncated: %q", b)
	}
	if e := call(t, c, proto.OpCreate, &proto.OpenReq{Export: "rw", Path: "secret", Flags: syscall.O_RDWR, Mode: 0o644}, &hr); e != 0 {
		t.Fatalf("create over a file by root: %v", e)
	}
}

// Unlink, rmdir, rename and link act only on the file the client checked
// (Dev, Ino): a file swapped in at the name since is ESTALE and is left
// alone.
func TestFSRemoveRenameLinkIdentity(t *testing.T) {
	c, rw, _ := setup(t)
	attr := func(p string) proto.Attr {
		t.Helper()
		var a proto.Attr
		if e := call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: p}, &a); e != 0 {
			t.Fatalf("getattr %s: %v", p, e)
		}
		return a
	}
	swap := func(name string, dir bool) (old proto.Attr) {
		t.Helper()
		p := filepath.Join(rw, name)
		os.RemoveAll(p)
		if dir {
			must(t, os.Mkdir(p, 0o755))
		} else {
			must(t, os.WriteFile(p, []byte("old"), 0o644))
		}
		old = attr(name)
		must(t, os.Rename(p, p+".moved"))
		if dir {
			must(t, os.Mkdir(p, 0o700))
		} else {
			must(t, os.WriteFile(p, []byte("swapped in"), 0o600))
		}
		return old
	}
	old := swap("f", false)
	if e := call(t, c, proto.OpUnlink, &proto.RemoveReq{Export: "rw", Path: "f", Dev: old.Dev, Ino: old.Ino}, &proto.Attr{}); e != syscall.ESTALE {
		t.Errorf("unlink of a swapped file: %v, want ESTALE", e)
	}
	old = swap("d", true)
	if e := call(t, c, proto.OpRmdir, &proto.RemoveReq{Export: "rw", Path: "d", Dev: old.Dev, Ino: old.Ino}, &proto.Attr{}); e != syscall.ESTALE {
		t.Errorf("rmdir of a swapped directory: %v, want ESTALE", e)
	}
	old = swap("r", false)
	if e := call(t, c, proto.OpRename, &proto.RenameReq{Export: "rw", From: "r", To: "r2", Dev: old.Dev, Ino: old.Ino}, nil); e != syscall.ESTALE {
		t.Errorf("rename of a swapped file: %v, want ESTALE", e)
	}
	must(t, os.WriteFile(filepath.Join(rw, "src"), []byte("src"), 0o644))
	src := attr("src")
	old = swap("dst", false)
	if e := call(t, c, proto.OpRename, &proto.RenameReq{Export: "rw", From: "src", To: "dst", Dev: src.Dev, Ino: src.Ino, ToDev: old.Dev, ToIno: old.Ino}, nil); e != syscall.ESTALE {
		t.Errorf("rename over a swapped target: %v, want ESTALE", e)
	}
	old = swap("l", false)
	var a proto.Attr
	if e := call(t, c, proto.OpLink, &proto.LinkReq{Export: "rw", From: "l", To: "l2", Dev: old.Dev, Ino: old.Ino}, &a); e != syscall.ESTALE {
		t.Errorf("link of a swapped file: %v, want ESTALE", e)
	}
	for _, name := range []string{"f", "r", "dst", "l"} {
		if b, err := os.ReadFile(filepath.Join(rw, name)); err != nil || string(b) != "swapped in" {
			t.Errorf("swapped-in %s: %q %v", name, b, err)
		}
	}
	if _, err := os.Stat(filepath.Join(rw, "d")); err != nil {
		t.Errorf("swapped-in directory removed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(rw, "l2")); !os.IsNotExist(err) {
		t.Errorf("link of a swapped file made l2: %v", err)
	}

	// With the right identity (and with none given) they work.
	cur := attr("f")
	if e := call(t, c, proto.OpUnlink, &proto.RemoveReq{Export: "rw", Path: "f", Dev: cur.Dev, Ino: cur.Ino}, &proto.Attr{}); e != 0 {
		t.Errorf("unlink: %v", e)
	}
	cur = attr("dst")
	if e := call(t, c, proto.OpRename, &proto.RenameReq{Export: "rw", From: "src", To: "dst", Dev: src.Dev, Ino: src.Ino, ToDev: cur.Dev, ToIno: cur.Ino}, nil); e != 0 {
		t.Errorf("rename: %v", e)
	}
	if e := call(t, c, proto.OpRename, &proto.RenameReq{Export: "rw", From: "dst", To: "new", Dev: src.Dev, Ino: src.Ino, ToIno: 99}, nil); e != 0 {
		t.Errorf("rename to a name the client thought taken, now free: %v", e)
	}
	if e := call(t, c, proto.OpLink, &proto.LinkReq{Export: "rw", From: "new", To: "d/hard", Dev: src.Dev, Ino: src.Ino}, &a); e != 0 || a.Nlink != 2 || a.Ino != src.Ino {
		t.Errorf("link: %v %+v", e, a)
	}
	if b, err := os.ReadFile(filepath.Join(rw, "d", "hard")); err != nil || string(b) != "src" {
		t.Errorf("hard link: %q %v", b, err)
	}
}

// Links stay inside the export and off directories; fallocate passes the
// modes a file system has and refuses the others.
func TestFSLinkAndFallocate(t *testing.T) {
	c, rw, ro := setup(t)
	must(t, os.WriteFile(filepath.Join(rw, "f"), []byte("f"), 0o644))
	must(t, os.Mkdir(filepath.Join(rw, "d"), 0o755))
	must(t, os.Symlink("/tmp", filepath.Join(rw, "out")))
	os.WriteFile(filepath.Join(ro, "g"), []byte("g"), 0o644)
	var a proto.Attr
	for _, tc := range []struct {
		r    proto.LinkReq
		want syscall.Errno
	}{
		{proto.LinkReq{Export: "rw", From: "f", To: "../f"}, syscall.EACCES},
		{proto.LinkReq{Export: "rw", From: "f", To: "out/f"}, syscall.EACCES},
		{proto.LinkReq{Export: "rw", From: "../etc/passwd", To: "p"}, syscall.EACCES},
		{proto.LinkReq{Export: "rw", From: "d", To: "d2"}, syscall.EPERM},
		{proto.LinkReq{Export: "rw", From: "", To: "root"}, syscall.EINVAL},
		{proto.LinkReq{Export: "rw", From: "f", To: ""}, syscall.EINVAL},
		{proto.LinkReq{Export: "ro", From: "g", To: "h"}, syscall.EROFS},
		{proto.LinkReq{Export: "rw", From: "f", To: "f"}, syscall.EEXIST},
	} {
		if e := call(t, c, proto.OpLink, &tc.r, &a); e != tc.want {
			t.Errorf("link %+v: %v, want %v", tc.r, e, tc.want)
		}
	}
	if _, err := os.Lstat("/tmp/f"); err == nil {
		t.Errorf("a link made outside the export")
	}

	var hr proto.HandleReply
	if e := call(t, c, proto.OpOpen, &proto.OpenReq{Export: "rw", Path: "f", Flags: syscall.O_RDWR}, &hr); e != 0 {
		t.Fatal(e)
	}
	if e := call(t, c, proto.OpFallocate, &proto.FallocateReq{Handle: hr.Handle, Offset: 0, Length: 1 << 20}, nil); e != 0 {
		t.Errorf("fallocate: %v", e)
	}
	if st, _ := os.Stat(filepath.Join(rw, "f")); st.Size() != 1<<20 {
		t.Errorf("size after fallocate of 1 MiB: %d", st.Size())
	}
	if e := call(t, c, proto.OpFallocate, &proto.FallocateReq{Handle: hr.Handle, Offset: 0, Length: 4096, Mode: 0x8 /* COLLAPSE_RANGE */}, nil); e != syscall.EOPNOTSUPP {
		t.Errorf("fallocate collapse: %v, want EOPNOTSUPP", e)
	}
	if e := call(t, c, proto.OpOpen, &proto.OpenReq{Export: "ro", Path: "g"}, &hr); e != 0 {
		t.Fatal(e)
	}
	if e := call(t, c, proto.OpFallocate, &proto.FallocateReq{Handle: hr.Handle, Length: 4096}, nil); e != syscall.EROFS {
		t.Errorf("fallocate on a read-only export: %v, want EROFS", e)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// Create, mkdir, symlink and link add a name only to the directory the
// client checked (DirDev, DirIno): another directory swapped in at that
// path since is ESTALE and stays untouched.
func TestFSAddToSwappedDirRefused(t *testing.T) {
	c, rw, _ := setup(t)
	must(t, os.Mkdir(filepath.Join(rw, "d"), 0o777))
	must(t, os.WriteFile(filepath.Join(rw, "f"), nil, 0o644))
	var old, f proto.Attr
	call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: "d"}, &old)
	call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: "f"}, &f)
	must(t, os.Rename(filepath.Join(rw, "d"), filepath.Join(rw, "d.moved")))
	must(t, os.Mkdir(filepath.Join(rw, "d"), 0o700)) // a directory the caller could not write
	var hr proto.HandleReply
	var a proto.Attr
	for name, e := range map[string]syscall.Errno{
		"create":  call(t, c, proto.OpCreate, &proto.OpenReq{Export: "rw", Path: "d/x", Flags: syscall.O_WRONLY, Mode: 0o644, DirDev: old.Dev, DirIno: old.Ino}, &hr),
		"mkdir":   call(t, c, proto.OpMkdir, &proto.OpenReq{Export: "rw", Path: "d/x", Mode: 0o755, DirDev: old.Dev, DirIno: old.Ino}, &proto.EntryReply{}),
		"symlink": call(t, c, proto.OpSymlink, &proto.SymlinkReq{Export: "rw", Path: "d/x", Target: "t", DirDev: old.Dev, DirIno: old.Ino}, &a),
		"link":    call(t, c, proto.OpLink, &proto.LinkReq{Export: "rw", From: "f", To: "d/x", Dev: f.Dev, Ino: f.Ino, DirDev: old.Dev, DirIno: old.Ino}, &a),
	} {
		if e != syscall.ESTALE {
			t.Errorf("%s in a swapped directory: %v, want ESTALE", name, e)
		}
	}
	if es, _ := os.ReadDir(filepath.Join(rw, "d")); len(es) != 0 {
		t.Errorf("the swapped-in directory got %v", es)
	}
	// In the directory checked, wherever it is now: the path names it.
	var cur proto.Attr
	call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: "d.moved"}, &cur)
	if e := call(t, c, proto.OpCreate, &proto.OpenReq{Export: "rw", Path: "d.moved/x", Flags: syscall.O_WRONLY, Mode: 0o644, DirDev: cur.Dev, DirIno: cur.Ino}, &hr); e != 0 {
		t.Errorf("create in the checked directory: %v", e)
	}
}

// A root server performs requests with the caller's credentials: its own
// kernel checks the caller's permissions (with supplementary groups), and
// what is created belongs to the caller, setgid directories included.
func TestFSCallerCredentials(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a server that is not root acts as itself")
	}
	c, rw, _ := setup(t)
	must(t, os.Chmod(rw, 0o755))
	user := proto.Cred{UID: 1000, GID: 1000}
	withGroup := proto.Cred{UID: 1000, GID: 1000, Groups: []uint32{4242}}
	root := proto.Cred{}
	mk := func(name string, mode uint32, gid int) {
		t.Helper()
		p := filepath.Join(rw, name)
		must(t, os.Mkdir(p, 0o700))
		must(t, os.Chown(p, 0, gid))
		must(t, syscall.Chmod(p, uint32(mode))) // raw bits: 0o2000 is setgid
	}
	mk("pub", 0o777, 0)
	mk("sgid", 0o2777, 50)
	mk("grp", 0o770, 4242)
	must(t, os.WriteFile(filepath.Join(rw, "rootfile"), []byte("r"), 0o644))
	var rf proto.Attr
	call(t, c, proto.OpGetattr, &proto.PathReq{Export: "rw", Path: "rootfile"}, &rf)

	var hr proto.HandleReply
	var a proto.Attr
	create := func(path string, cr proto.Cred) syscall.Errno {
		return call(t, c, proto.OpCreate, &proto.OpenReq{Export: "rw", Path: path, Flags: syscall.O_WRONLY, Mode: 0o640, Caller: cr}, &hr)
	}
	for _, tc := range []struct {
		what string
		got  syscall.Errno
		want syscall.Errno
	}{
		{"create in root's 0755 directory", create("x", user), syscall.EACCES},
		{"create there as root", create("x", root), 0},
		{"create in a 0777 directory", create("pub/f", user), 0},
		{"create in a setgid directory", create("sgid/f", user), 0},
		{"create in a 0770 directory of a group not held", create("grp/f", user), syscall.EACCES},
		{"create there with the group as a supplementary one", create("grp/f", withGroup), 0},
		{"mkdir in root's directory", call(t, c, proto.OpMkdir, &proto.OpenReq{Export: "rw", Path: "d", Mode: 0o755, Caller: user}, &proto.EntryReply{}), syscall.EACCES},
		{"symlink in root's directory", call(t, c, proto.OpSymlink, &proto.SymlinkReq{Export: "rw", Path: "l", Target: "t", Caller: user}, &a), syscall.EACCES},
		{"unlink of root's file", call(t, c, proto.OpUnlink, &proto.RemoveReq{Export: "rw", Path: "rootfile", Dev: rf.Dev, Ino: rf.Ino, Caller: user}, &a), syscall.EACCES},
		{"rename of root's file", call(t, c, proto.OpRename, &proto.RenameReq{Export: "rw", From: "rootfile", To: "pub/stolen", Dev: rf.Dev, Ino: rf.Ino, Caller: user}, nil), syscall.EACCES},
		{"open of root's 0644 file for writing", call(t, c, proto.OpOpen, &proto.OpenReq{Export: "rw", Path: "rootfile", Flags: syscall.O_WRONLY, Dev: rf.Dev, Ino: rf.Ino, Caller: user}, &hr), syscall.EACCES},
		{"open of root's 0644 file for reading", call(t, c, proto.OpOpen, &proto.OpenReq{Export: "rw", Path: "rootfile", Flags: syscall.O_RDONLY, Dev: rf.Dev, Ino: rf.Ino, Caller: user}, &hr), 0},
		{"chmod of root's file", call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "rw", Path: "rootfile", Valid: proto.SetMode, Mode: 0o666, Dev: rf.Dev, Ino: rf.Ino, Caller: user}, &a), syscall.EPERM},
		{"truncate of root's file", call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "rw", Path: "rootfile", Valid: proto.SetSize, Dev: rf.Dev, Ino: rf.Ino, Caller: user}, &a), syscall.EACCES},
		{"hard link of root's file into a 0777 directory", call(t, c, proto.OpLink, &proto.LinkReq{Export: "rw", From: "rootfile", To: "pub/hard", Dev: rf.Dev, Ino: rf.Ino, Caller: user}, &a), syscall.EPERM}, // fs.protected_hardlinks
	} {
		if tc.got != tc.want {
			t.Errorf("%s by uid 1000: %v, want %v", tc.what, tc.got, tc.want)
		}
	}
	for name, want := range map[string][2]uint32{"pub/f": {1000, 1000}, "sgid/f": {1000, 50}, "grp/f": {1000, 1000}} {
		st, err := os.Stat(filepath.Join(rw, name))
		must(t, err)
		if s := st.Sys().(*syscall.Stat_t); s.Uid != want[0] || s.Gid != want[1] || st.Mode().Perm() != 0o640 {
			t.Errorf("%s created by uid 1000: %d:%d %v, want %d:%d -rw-r-----", name, s.Uid, s.Gid, st.Mode(), want[0], want[1])
		}
	}
	if b, _ := os.ReadFile(filepath.Join(rw, "rootfile")); string(b) != "r" {
		t.Errorf("root's file changed: %q", b)
	}
	// The owner may chmod, and the server's threads are root again after.
	if e := call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "rw", Path: "pub/f", Valid: proto.SetMode, Mode: 0o600, Caller: user}, &a); e != 0 || a.Mode&0o777 != 0o600 {
		t.Errorf("chmod by the owner: %v %o", e, a.Mode)
	}
	if e := create("x2", root); e != 0 {
		t.Errorf("create as root after requests as uid 1000: %v", e)
	}
}

// TestFSRootSquash: in a root-squash export, root on another member is
// nobody: it cannot change root's files, and what it creates is nobody's.
// Without the option (the "rw" export of setup), root stays root.
func TestFSRootSquash(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a server that is not root acts as itself")
	}
	dir := t.TempDir()
	must(t, os.Chmod(dir, 0o755))
	must(t, os.Mkdir(filepath.Join(dir, "pub"), 0o777))
	must(t, os.Chmod(filepath.Join(dir, "pub"), 0o777))
	must(t, os.WriteFile(filepath.Join(dir, "rootfile"), []byte("r"), 0o644))
	c := serve(t, server.Export{Name: "sq", Path: dir, RootSquash: true})

	root := proto.Cred{Groups: []uint32{0}}
	var rf, a proto.Attr
	call(t, c, proto.OpGetattr, &proto.PathReq{Export: "sq", Path: "rootfile"}, &rf)
	var hr proto.HandleReply
	for _, tc := range []struct {
		what string
		got  syscall.Errno
		want syscall.Errno
	}{
		{"create in root's 0755 directory", call(t, c, proto.OpCreate, &proto.OpenReq{Export: "sq", Path: "x", Flags: syscall.O_WRONLY, Mode: 0o644, Caller: root}, &hr), syscall.EACCES},
		{"open of root's 0644 file for writing", call(t, c, proto.OpOpen, &proto.OpenReq{Export: "sq", Path: "rootfile", Flags: syscall.O_WRONLY, Dev: rf.Dev, Ino: rf.Ino, Caller: root}, &hr), syscall.EACCES},
		{"chmod of root's file", call(t, c, proto.OpSetattr, &proto.SetattrReq{Export: "sq", Path: "rootfile", Valid: proto.SetMode, Mode: 0o666, Dev: rf.Dev, Ino: rf.Ino, Caller: root}, &a), syscall.EPERM},
		{"unlink of root's file", call(t, c, proto.OpUnlink, &proto.RemoveReq{Export: "sq", Path: "rootfile", Dev: rf.Dev, Ino: rf.Ino, Caller: root}, &a), syscall.EACCES},
		{"create in a 0777 directory", call(t, c, proto.OpCreate, &proto.OpenReq{Export: "sq", Path: "pub/f", Flags: syscall.O_WRONLY, Mode: 0o644, Caller: root}, &hr), 0},
		{"mkdir in a 0777 directory", call(t, c, proto.OpMkdir, &proto.OpenReq{Export: "sq", Path: "pub/d", Mode: 0o755, Caller: root}, &proto.EntryReply{}), 0},
	} {
		if tc.got != tc.want {
			t.Errorf("%s by squashed root: %v, want %v", tc.what, tc.got, tc.want)
		}
	}
	for _, name := range []string{"pub/f", "pub/d"} {
		st, err := os.Stat(filepath.Join(dir, name))
		must(t, err)
		if s := st.Sys().(*syscall.Stat_t); s.Uid != server.Nobody || s.Gid != server.Nobody {
			t.Errorf("%s made by squashed root is %d:%d, want nobody's", name, s.Uid, s.Gid)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "rootfile")); string(b) != "r" {
		t.Errorf("root's file changed: %q", b)
	}
	// The same requests on an export without the option: root is root.
	c2, rw, _ := setup(t)
	must(t, os.Chmod(rw, 0o755))
	if e := call(t, c2, proto.OpCreate, &proto.OpenReq{Export: "rw", Path: "x", Flags: syscall.O_WRONLY, Mode: 0o644, Caller: root}, &hr); e != 0 {
		t.Errorf("create as root without root-squash: %v", e)
	}
}
