package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/internal/testenv"
	"github.com/onebox-project/onebox/testbed"
)

func needFUSE(t *testing.T) {
	t.Helper()
	testenv.Need(t, os.Geteuid() == 0, "the cluster filesystem mount needs root")
	_, err := os.Stat("/dev/fuse")
	testenv.NeedNoError(t, err, "the cluster filesystem mount needs /dev/fuse")
}

// mountOf is node n's mount of the cluster filesystem.
func mountOf(n *testbed.Node) string { return filepath.Join(n.DataDir, "mnt") }

// startFSCluster starts two agents that export scratch (read-write) and
// ro (read-only), each mounting the namespace at DATA_DIR/mnt.
func startFSCluster(t *testing.T) (*testbed.Cluster, string) {
	needFUSE(t)
	ro := t.TempDir()
	if err := os.WriteFile(filepath.Join(ro, "readme"), []byte("read only\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := startCluster(t, testbed.Options{Nodes: 2, AgentArgs: []string{"--export", "ro=" + ro + ":ro"}})
	for _, n := range c.Nodes {
		for _, o := range c.Nodes {
			p := filepath.Join(mountOf(n), o.Name, "scratch")
			if err := testbed.WaitFor(ctxT(t, 30*time.Second), 20*time.Second, p, func(context.Context) (bool, error) {
				_, err := os.Stat(p)
				return err == nil, err
			}); err != nil {
				t.Fatal(err)
			}
		}
	}
	return c, ro
}

// boundedErr runs f (a file operation through the mount) and fails the
// test if it does not return within a generous bound: the mount must
// never hang. The bound is not a performance assertion.
func boundedErr(t *testing.T, what string, f func() error) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- f() }()
	select {
	case err := <-errc:
		return err
	case <-time.After(60 * time.Second):
		t.Fatalf("%s hung through the mount", what)
		return nil
	}
}

func TestCFSMount(t *testing.T) {
	t.Parallel()
	c, roDir := startFSCluster(t)
	n1, n2 := c.Nodes[0], c.Nodes[1]
	remote := filepath.Join(mountOf(n1), "n2", "scratch") // n2's scratch seen from n1
	back := filepath.Join(mountOf(n2), "n1", "scratch")   // n1's scratch seen from n2
	local2 := filepath.Join(n2.DataDir, "scratch")
	local1 := filepath.Join(n1.DataDir, "scratch")

	t.Run("Layout", func(t *testing.T) {
		names := func(dir string) []string {
			es, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			var out []string
			for _, e := range es {
				out = append(out, e.Name())
			}
			return out
		}
		if got := names(mountOf(n1)); !slices.Equal(got, []string{"n1", "n2"}) {
			t.Fatalf("mount root lists %v, want [n1 n2]", got)
		}
		if got := names(filepath.Join(mountOf(n1), "n2")); !slices.Equal(got, []string{"ro", "scratch"}) {
			t.Fatalf("n2 lists %v, want [ro scratch]", got)
		}
		r := cli(t, []string{"ONEBOX_AGENT=" + n1.Agent()}, "exports", "-o", "json")
		var rows []struct {
			Node, Name string
			ReadOnly   bool `json:"read_only"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &rows); err != nil || r.code != 0 || len(rows) != 4 {
			t.Fatalf("exports -o json: exit %d, %v, %d rows\n%s%s", r.code, err, len(rows), r.stdout, r.stderr)
		}
		for _, x := range rows {
			if x.ReadOnly != (x.Name == "ro") {
				t.Fatalf("exports: %+v", x)
			}
		}
	})

	t.Run("WriteBothWays", func(t *testing.T) {
		data := randomBytes(300 << 10)
		if err := os.WriteFile(filepath.Join(remote, "from-n1"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(filepath.Join(local2, "from-n1")); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("file written on n1 through the mount: on n2 %d bytes, err %v; want the %d bytes written", len(got), err, len(data))
		}
		if err := os.WriteFile(filepath.Join(back, "from-n2"), data[:1000], 0o600); err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(filepath.Join(local1, "from-n2")); err != nil || !bytes.Equal(got, data[:1000]) {
			t.Fatalf("file written on n2 through the mount: on n1 %d bytes, err %v", len(got), err)
		}
		// Its own exports, through its own mount.
		if got, err := os.ReadFile(filepath.Join(mountOf(n1), "n1", "scratch", "from-n2")); err != nil || !bytes.Equal(got, data[:1000]) {
			t.Fatalf("n1 reading its own export through the mount: %d bytes, err %v", len(got), err)
		}
	})

	t.Run("LargeFileSHA256", func(t *testing.T) {
		const size = 64 << 20
		f, err := os.Create(filepath.Join(local2, "big"))
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		rng := rand.NewChaCha8([32]byte{1})
		if _, err := io.CopyN(io.MultiWriter(f, h), rng, size); err != nil {
			t.Fatal(err)
		}
		f.Close()
		want := fmt.Sprintf("%x", h.Sum(nil))
		start := time.Now()
		out, err := exec.Command("sha256sum", filepath.Join(remote, "big")).Output()
		if err != nil {
			t.Fatalf("sha256sum through the mount: %v", err)
		}
		t.Logf("read 64 MiB through n1's mount of n2 at %.0f MB/s (one run, information only)", size/1e6/time.Since(start).Seconds())
		if got := strings.Fields(string(out))[0]; got != want {
			t.Fatalf("sha256 through the mount %s, original %s", got, want)
		}
		// mmap for reading
		mf, err := os.Open(filepath.Join(remote, "big"))
		must(t, err)
		mm, err := syscall.Mmap(int(mf.Fd()), 0, size, syscall.PROT_READ, syscall.MAP_SHARED)
		must(t, err)
		if got := fmt.Sprintf("%x", sha256.Sum256(mm)); got != want {
			t.Fatalf("sha256 of the mmapped file %s, original %s", got, want)
		}
		syscall.Munmap(mm)
		mf.Close()
		// Concurrent readers of one file see the same bytes.
		errc := make(chan error, 4)
		for i := range 4 {
			go func() {
				f, err := os.Open(filepath.Join(remote, "big"))
				if err != nil {
					errc <- err
					return
				}
				defer f.Close()
				buf := make([]byte, 1<<20)
				off := int64(i) * 8 << 20
				if _, err := f.ReadAt(buf, off); err != nil {
					errc <- err
					return
				}
				orig, _ := os.ReadFile(filepath.Join(local2, "big"))
				if !bytes.Equal(buf, orig[off:off+1<<20]) {
					errc <- fmt.Errorf("reader %d: bytes differ at offset %d", i, off)
					return
				}
				errc <- nil
			}()
		}
		for range 4 {
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("TarRoundTrip", func(t *testing.T) {
		src := t.TempDir()
		for i := range 500 {
			dir := filepath.Join(src, fmt.Sprintf("d%02d", i%20))
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%03d", i)), randomBytes(i*7%4096), 0o640); err != nil {
				t.Fatal(err)
			}
		}
		dst := filepath.Join(remote, "tree")
		if err := os.Mkdir(dst, 0o755); err != nil {
			t.Fatal(err)
		}
		tarPipe(t, src, dst)
		out := t.TempDir()
		tarPipe(t, dst, out)
		for _, got := range []string{filepath.Join(local2, "tree"), out} {
			if err := sameTree(src, got); err != nil {
				t.Fatalf("tar round trip through the mount: %v", err)
			}
		}
	})

	t.Run("Semantics", func(t *testing.T) {
		d := filepath.Join(remote, "sem")
		ld := filepath.Join(local2, "sem")
		must(t, os.Mkdir(d, 0o755))
		must(t, os.WriteFile(filepath.Join(d, "a"), []byte("hello"), 0o644))
		// append
		f, err := os.OpenFile(filepath.Join(d, "a"), os.O_APPEND|os.O_WRONLY, 0)
		must(t, err)
		_, err = f.WriteString(" world")
		must(t, err)
		must(t, f.Sync())
		must(t, f.Close())
		wantFile(t, filepath.Join(ld, "a"), "hello world")
		// write at an offset
		f, err = os.OpenFile(filepath.Join(d, "a"), os.O_RDWR, 0)
		must(t, err)
		_, err = f.WriteAt([]byte("J"), 6)
		must(t, err)
		// ftruncate on an open file, truncate by path
		must(t, f.Truncate(8))
		must(t, f.Close())
		wantFile(t, filepath.Join(ld, "a"), "hello Jo")
		must(t, os.Truncate(filepath.Join(d, "a"), 5))
		wantFile(t, filepath.Join(ld, "a"), "hello")
		// rename, into a subdirectory, over an existing file
		must(t, os.Mkdir(filepath.Join(d, "sub"), 0o700))
		must(t, os.Rename(filepath.Join(d, "a"), filepath.Join(d, "sub", "b")))
		wantFile(t, filepath.Join(ld, "sub", "b"), "hello")
		if _, err := os.Stat(filepath.Join(ld, "a")); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("renamed file still at its old name: %v", err)
		}
		must(t, os.WriteFile(filepath.Join(d, "c"), []byte("other"), 0o644))
		must(t, os.Rename(filepath.Join(d, "c"), filepath.Join(d, "sub", "b")))
		wantFile(t, filepath.Join(d, "sub", "b"), "other")
		// a renamed directory keeps working under its new name
		must(t, os.Rename(filepath.Join(d, "sub"), filepath.Join(d, "sub2")))
		wantFile(t, filepath.Join(d, "sub2", "b"), "other")
		// chmod and mtime
		must(t, os.Chmod(filepath.Join(d, "sub2", "b"), 0o600))
		mt := time.Date(2020, 1, 2, 3, 4, 5, 600, time.UTC)
		must(t, os.Chtimes(filepath.Join(d, "sub2", "b"), mt, mt))
		st, err := os.Stat(filepath.Join(ld, "sub2", "b"))
		must(t, err)
		if st.Mode().Perm() != 0o600 || !st.ModTime().Equal(mt) {
			t.Fatalf("after chmod 600 and mtime %v: mode %v mtime %v", mt, st.Mode(), st.ModTime())
		}
		if st2, err := os.Stat(filepath.Join(d, "sub2", "b")); err != nil || st2.Mode().Perm() != 0o600 || !st2.ModTime().Equal(mt) {
			t.Fatalf("through the mount after chmod and mtime: %v %v", st2.Mode(), err)
		}
		// unlink, rmdir, and their errors
		if err := os.Remove(filepath.Join(d, "sub2")); !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
			t.Fatalf("rmdir of a non-empty directory: %v, want ENOTEMPTY", err)
		}
		must(t, os.Remove(filepath.Join(d, "sub2", "b")))
		must(t, os.Remove(filepath.Join(d, "sub2")))
		if _, err := os.Stat(filepath.Join(ld, "sub2")); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("removed directory still there: %v", err)
		}
		if _, err := os.Stat(filepath.Join(d, "nothing")); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("stat of a missing file: %v, want ENOENT", err)
		}
		if err := os.Mkdir(d, 0o755); !errors.Is(err, fs.ErrExist) {
			t.Fatalf("mkdir of an existing directory: %v, want EEXIST", err)
		}
		// O_EXCL
		if _, err := os.OpenFile(filepath.Join(d, "x"), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := os.OpenFile(filepath.Join(d, "x"), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); !errors.Is(err, fs.ErrExist) {
			t.Fatalf("O_EXCL create of an existing file: %v, want EEXIST", err)
		}
		// a directory with many entries
		many := filepath.Join(local2, "many")
		must(t, os.Mkdir(many, 0o755))
		for i := range 3000 {
			must(t, os.WriteFile(filepath.Join(many, fmt.Sprintf("entry-with-a-longish-name-%05d", i)), nil, 0o644))
		}
		es, err := os.ReadDir(filepath.Join(remote, "many"))
		if err != nil || len(es) != 3000 {
			t.Fatalf("readdir of 3000 entries through the mount: %d entries, %v", len(es), err)
		}
		// what an unprivileged user creates is theirs on the owning node
		if _, err := exec.LookPath("setpriv"); err == nil {
			pub := filepath.Join(d, "pub")
			must(t, os.Mkdir(pub, 0o777))
			must(t, os.Chmod(pub, 0o777))
			// Started in pub (as root): the test's directories above the
			// mount are closed to other users.
			cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
				"sh", "-c", `echo x > file && mkdir dir`)
			cmd.Dir = pub
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("create as uid 65534 through the mount: %v\n%s", err, out)
			}
			for _, name := range []string{"file", "dir"} {
				st, err := os.Stat(filepath.Join(ld, "pub", name))
				must(t, err)
				if sys := st.Sys().(*syscall.Stat_t); sys.Uid != 65534 || sys.Gid != 65534 {
					t.Fatalf("%s created by uid 65534 through the mount is owned by %d:%d on the node", name, sys.Uid, sys.Gid)
				}
			}
		}
		// statfs
		var sfs syscall.Statfs_t
		must(t, syscall.Statfs(remote, &sfs))
		if sfs.Blocks == 0 {
			t.Fatalf("statfs through the mount: %+v", sfs)
		}
	})

	t.Run("ReadOnlyExport", func(t *testing.T) {
		ro := filepath.Join(mountOf(n1), "n2", "ro")
		wantFile(t, filepath.Join(ro, "readme"), "read only\n")
		for what, err := range map[string]error{
			"create":     os.WriteFile(filepath.Join(ro, "new"), []byte("x"), 0o644),
			"open write": openErr(filepath.Join(ro, "readme"), os.O_WRONLY),
			"open trunc": openErr(filepath.Join(ro, "readme"), os.O_RDWR|os.O_TRUNC),
			"mkdir":      os.Mkdir(filepath.Join(ro, "d"), 0o755),
			"unlink":     os.Remove(filepath.Join(ro, "readme")),
			"rename":     os.Rename(filepath.Join(ro, "readme"), filepath.Join(ro, "other")),
			"chmod":      os.Chmod(filepath.Join(ro, "readme"), 0o600),
			"truncate":   os.Truncate(filepath.Join(ro, "readme"), 0),
			"utimes":     os.Chtimes(filepath.Join(ro, "readme"), time.Now(), time.Now()),
			"mkdir own":  os.Mkdir(filepath.Join(mountOf(n1), "n1", "ro", "d"), 0o755),
		} {
			if !errors.Is(err, syscall.EROFS) {
				t.Errorf("%s on a read-only export: %v, want EROFS", what, err)
			}
		}
		wantFile(t, filepath.Join(roDir, "readme"), "read only\n")
	})

	t.Run("NoEscape", func(t *testing.T) {
		must(t, os.Symlink("/etc", filepath.Join(local2, "etc")))
		must(t, os.Symlink("../..", filepath.Join(local2, "up")))
		must(t, os.Symlink(filepath.Join(local2, "from-n1"), filepath.Join(local2, "abs"))) // absolute, even if inside
		must(t, os.Symlink("from-n1", filepath.Join(local2, "rel")))
		must(t, os.Symlink("sem", filepath.Join(local2, "semlink")))
		// Symlinks are shown as symlinks, with their targets as stored:
		// the node never resolves them (refusing links that lead out of
		// the export is covered by the server's unit tests); the kernel
		// of the mounting node does, in its own namespace.
		for name, target := range map[string]string{"etc": "/etc", "up": "../..", "abs": filepath.Join(local2, "from-n1"), "rel": "from-n1"} {
			st, err := os.Lstat(filepath.Join(remote, name))
			if err != nil || st.Mode()&fs.ModeSymlink == 0 {
				t.Errorf("lstat %s: %v, %v, want a symlink", name, st, err)
			}
			if got, err := os.Readlink(filepath.Join(remote, name)); err != nil || got != target {
				t.Errorf("readlink %s: %q, %v, want %q", name, got, err, target)
			}
		}
		// A relative link leading up resolves within the mount: never to
		// the node's directory above the export.
		if _, err := os.ReadFile(filepath.Join(remote, "up", "agent.log")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("reading up/agent.log (up -> ../..): %v, want ENOENT", err)
		}
		// A symlink that stays inside the export is followed.
		if got, err := os.ReadFile(filepath.Join(remote, "rel")); err != nil || len(got) != 300<<10 {
			t.Errorf("reading a symlink inside the export: %d bytes, %v", len(got), err)
		}
		// and a symlink to a directory inside is a directory to find -H
		out, err := exec.Command("find", "-H", filepath.Join(remote, "semlink"), "-name", "x").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "semlink/x") {
			t.Errorf("find through a symlink to a directory inside the export: %v\n%s", err, out)
		}
		// ".." of an export is the node's directory in the namespace, not
		// the directory above the export on the node.
		es, err := os.ReadDir(filepath.Join(remote, ".."))
		must(t, err)
		for _, e := range es {
			if e.Name() != "scratch" && e.Name() != "ro" {
				t.Errorf("%s/.. lists %q", remote, e.Name())
			}
		}
	})

	// A symlink to "." used to be shown as the export root itself: listing
	// it looped the mounting agent's inode tree until it ran out of
	// memory.
	t.Run("SymlinkLoop", func(t *testing.T) {
		must(t, os.Symlink(".", filepath.Join(local2, "loop")))
		for _, p := range []string{"loop", "loop/loop/sem"} {
			err := boundedErr(t, "ls "+p, func() error {
				_, err := os.ReadDir(filepath.Join(remote, p))
				return err
			})
			must(t, err)
		}
		st, err := os.Lstat(filepath.Join(remote, "loop"))
		if err != nil || st.Mode()&fs.ModeSymlink == 0 {
			t.Fatalf("lstat loop: %v %v, want a symlink", st, err)
		}
		// The mounting agent is alive and well.
		if r := cli(t, []string{"ONEBOX_AGENT=" + n1.Agent()}, "exports"); r.code != 0 {
			t.Fatalf("n1 after ls loop: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		must(t, os.Remove(filepath.Join(remote, "loop")))
	})

	// rm -rf of a directory holding a symlink to another directory used
	// to follow the link (shown as a directory) and empty its target.
	t.Run("RemoveAllKeepsLinkTargets", func(t *testing.T) {
		must(t, os.MkdirAll(filepath.Join(local2, "important"), 0o755))
		must(t, os.WriteFile(filepath.Join(local2, "important", "file"), []byte("keep"), 0o644))
		must(t, os.MkdirAll(filepath.Join(local2, "data"), 0o755))
		must(t, os.Symlink("../important", filepath.Join(local2, "data", "link")))
		err := boundedErr(t, "rm -rf", func() error {
			out, err := exec.Command("rm", "-rf", filepath.Join(remote, "data")).CombinedOutput()
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
		must(t, err)
		wantFile(t, filepath.Join(local2, "important", "file"), "keep")
		if _, err := os.Lstat(filepath.Join(local2, "data")); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("data after rm -rf: %v", err)
		}
	})

	t.Run("Metrics", func(t *testing.T) {
		if m := scrape(t, n1); !strings.Contains(m, `onebox_cfs_request_duration_seconds_count{op="read",result="ok"}`) {
			t.Errorf("n1's metrics lack its reads through the mount")
		}
		if m := scrape(t, n2); !strings.Contains(m, `onebox_cfs_served_requests_total{op="read",result="ok"}`) ||
			!strings.Contains(m, `onebox_cfs_served_requests_total{op="create",result="EROFS"}`) {
			t.Errorf("n2's metrics lack the reads and refused creates it served")
		}
	})

	t.Run("NodeDownAndBack", func(t *testing.T) {
		p := filepath.Join(remote, "from-n1")
		must(t, c.Kill(n2))
		err := boundedErr(t, "read of a killed node's file", func() error {
			_, err := os.ReadFile(p)
			return err
		})
		if !errors.Is(err, syscall.ENOTCONN) && !errors.Is(err, syscall.EIO) {
			t.Fatalf("reading a file of a killed node: %v, want ENOTCONN or EIO", err)
		}
		err = boundedErr(t, "readdir of a killed node's export", func() error {
			_, err := os.ReadDir(remote)
			return err
		})
		if !errors.Is(err, syscall.ENOTCONN) && !errors.Is(err, syscall.EIO) {
			t.Fatalf("listing a killed node's export: %v, want ENOTCONN or EIO", err)
		}
		// The killed agent's own mount does not stop its restart.
		must(t, c.StartNode(ctxT(t, 60*time.Second), n2))
		if err := testbed.WaitFor(ctxT(t, 60*time.Second), 30*time.Second, "n2's export readable again through n1", func(context.Context) (bool, error) {
			got, err := os.ReadFile(p)
			return err == nil && len(got) == 300<<10, err
		}); err != nil {
			t.Fatal(err)
		}
		if _, err := os.ReadDir(filepath.Join(mountOf(n2), "n1", "scratch")); err != nil {
			t.Fatalf("restarted n2's mount: %v", err)
		}
	})
}

func openErr(p string, flag int) error {
	f, err := os.OpenFile(p, flag, 0)
	if err == nil {
		f.Close()
	}
	return err
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func wantFile(t *testing.T, p, want string) {
	t.Helper()
	got, err := os.ReadFile(p)
	if err != nil || string(got) != want {
		t.Fatalf("%s: %q, %v; want %q", p, got, err, want)
	}
}

// tarPipe copies the tree src into dst with tar | tar.
func tarPipe(t *testing.T, src, dst string) {
	t.Helper()
	cmd := exec.Command("sh", "-c", `tar -C "$1" -cf - . | tar -C "$2" -xf -`, "sh", src, dst)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tar %s → %s: %v\n%s", src, dst, err, out)
	}
}

// sameTree compares the regular files, their modes and contents.
func sameTree(a, b string) error {
	n := 0
	err := filepath.WalkDir(a, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(a, p)
		sa, err := os.Stat(p)
		if err != nil {
			return err
		}
		sb, err := os.Stat(filepath.Join(b, rel))
		if err != nil {
			return err
		}
		if sa.Mode() != sb.Mode() {
			return fmt.Errorf("%s: mode %v, want %v", rel, sb.Mode(), sa.Mode())
		}
		if d.Type().IsRegular() {
			n++
			x, _ := os.ReadFile(p)
			y, err := os.ReadFile(filepath.Join(b, rel))
			if err != nil || !bytes.Equal(x, y) {
				return fmt.Errorf("%s: contents differ (%v)", rel, err)
			}
			// tar keeps whole seconds
			if !sa.ModTime().Truncate(time.Second).Equal(sb.ModTime().Truncate(time.Second)) {
				return fmt.Errorf("%s: mtime %v, want %v", rel, sb.ModTime(), sa.ModTime())
			}
		}
		return nil
	})
	if err == nil && n != 500 {
		err = fmt.Errorf("%d files compared, want 500", n)
	}
	return err
}

// A node cut off the network (its packets dropped, no connection reset)
// makes its subtree fail with EIO or ENOTCONN, bounded by the request
// timeout, not hang; when the link heals it works again. Netns agents run
// in their own mount namespace, so the mount is reached through it.
func TestCFSPartition(t *testing.T) {
	needFUSE(t)
	needNetns(t)
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 2, NetNS: true})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	must(t, os.WriteFile(filepath.Join(n2.DataDir, "scratch", "f"), []byte("on n2\n"), 0o644))
	cat := func() (string, error) {
		var out string
		err := boundedErr(t, "cat through the mount", func() error {
			b, err := exec.Command("nsenter", "--mount=/proc/"+strconv.Itoa(n1.Ready.PID)+"/ns/mnt", "--",
				"cat", filepath.Join(mountOf(n1), "n2", "scratch", "f")).CombinedOutput()
			out = string(b)
			return err
		})
		return out, err
	}
	if err := testbed.WaitFor(ctxT(t, 60*time.Second), 30*time.Second, "n2's file through n1's mount", func(context.Context) (bool, error) {
		out, err := cat()
		return err == nil && out == "on n2\n", err
	}); err != nil {
		t.Fatal(err)
	}
	must(t, c.Cut(ctxT(t, 30*time.Second), n2))
	out, err := cat()
	if err == nil || !strings.Contains(out, "Transport endpoint is not connected") && !strings.Contains(out, "Input/output error") {
		t.Fatalf("reading a cut-off node's file: %v %q, want ENOTCONN or EIO", err, out)
	}
	t.Logf("reading a cut-off node's file: %s", strings.TrimSpace(out))
	must(t, c.Heal(ctxT(t, 30*time.Second), n2))
	if err := testbed.WaitFor(ctxT(t, 90*time.Second), 60*time.Second, "n2's file readable again after the heal", func(context.Context) (bool, error) {
		out, err := cat()
		return err == nil && out == "on n2\n", err
	}); err != nil {
		t.Fatal(err)
	}
}

// A mount asked for explicitly that cannot be made stops the agent with
// advice; a relative one is a usage error. (The default /onebox is never
// tried by tests: it is taken only when free, with a warning otherwise,
// see cfs/fusefs.InUse.)
func TestCFSMountPointChoice(t *testing.T) {
	needFUSE(t)
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 1})
	dir := filepath.Join(t.TempDir(), "d")
	if r := cli(t, nil, "init", "--data-dir", dir, "--name", "solo", "--advertise", "127.0.0.1"); r.code != 0 {
		t.Fatalf("init: %s", r.stderr)
	}
	args := []string{"agent", "--data-dir", dir, "--bind", "127.0.0.1", "--gossip-port", "-1", "--fabric-port", "-1", "--no-discover"}
	r := cli(t, nil, append(args, "--mount", mountOf(c.Nodes[0]))...)
	if r.code != 1 || !strings.Contains(r.stderr, "already mounted by a running onebox agent") || !strings.Contains(r.stderr, "--mount none") {
		t.Errorf("--mount on a live mount: exit %d, %q; want 1 and advice", r.code, r.stderr)
	}
	r = cli(t, nil, append(args, "--mount", "rel/ative")...)
	if r.code != 2 || !strings.Contains(r.stderr, "must be an absolute path") {
		t.Errorf("--mount rel/ative: exit %d, %q; want 2", r.code, r.stderr)
	}
	if _, err := os.ReadDir(filepath.Join(mountOf(c.Nodes[0]), "n1", "scratch")); err != nil {
		t.Errorf("the running agent's mount after another agent was refused it: %v", err)
	}
}
