package fusefs

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
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
