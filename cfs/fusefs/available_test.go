package fusefs

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/cfs/client"
)

// The default mount point is taken only when free.
func TestInUse(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	full := filepath.Join(dir, "full")
	file := filepath.Join(dir, "file")
	for _, d := range []string{empty, full} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(full, "x"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		dir  string
		want string // "" for free
	}{
		{filepath.Join(dir, "missing"), ""},
		{empty, ""},
		{full, "with files in it"},
		{file, "not a directory"},
	} {
		err := InUse(tc.dir)
		if (err == nil) != (tc.want == "") || err != nil && !strings.Contains(err.Error(), tc.want) {
			t.Errorf("InUse(%s) = %v, want %q", filepath.Base(tc.dir), err, tc.want)
		}
	}
}

// A mount point of another filesystem, or of a live onebox mount, is in
// use; a dead onebox mount is not (New detaches it).
func TestInUseMounted(t *testing.T) {
	needFUSE(t)
	tmpfs := filepath.Join(t.TempDir(), "tmpfs")
	if err := os.Mkdir(tmpfs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("onebox-test", tmpfs, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	defer unmountQuietly(tmpfs)
	if err := InUse(tmpfs); err == nil || !strings.Contains(err.Error(), "(tmpfs)") {
		t.Errorf("InUse(a tmpfs mount point) = %v", err)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	mountOne(t, mnt)
	if err := InUse(mnt); err == nil || !strings.Contains(err.Error(), "another running onebox agent") {
		t.Errorf("InUse(a live onebox mount) = %v", err)
	}
	if err := CanMount(); err != nil {
		t.Errorf("CanMount as root with /dev/fuse: %v", err)
	}
}

// A onebox mount whose agent is alive but does not answer (stopped,
// stuck) does not hang the next agent's start: the probe is bounded.
func TestInUseHungMount(t *testing.T) {
	needFUSE(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	release := make(chan struct{})
	m, err := New(Options{
		Mountpoint: mnt,
		Nodes:      func() []string { <-release; return nil },
		Client:     func(string) *client.Client { return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	defer close(release) // before Close: the hung request ends first
	old := probeTimeout
	probeTimeout = 300 * time.Millisecond
	defer func() { probeTimeout = old }()
	for name, f := range map[string]func(string) error{"InUse": InUse, "PrepareMountpoint": PrepareMountpoint} {
		done := make(chan error, 1)
		go func() { done <- f(mnt) }()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "does not answer") {
				t.Errorf("%s(a mount whose agent does not answer) = %v", name, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s of a mount whose agent does not answer still waiting after 30 s", name)
		}
	}
}
