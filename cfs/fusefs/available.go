package fusefs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// CanMount says why this process cannot mount the namespace at all: the
// mount is a direct one (no fusermount), which needs root and /dev/fuse.
func CanMount() error {
	if os.Geteuid() != 0 {
		return errors.New("cfs: mounting the cluster filesystem needs root (the agent mounts directly, without fusermount)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("cfs: mounting the cluster filesystem needs /dev/fuse: %w (modprobe fuse)", err)
	}
	return nil
}

// InUse says why dir should not be taken by a mount nobody asked for (the
// default /onebox): another filesystem, or a live onebox agent, is mounted
// there, or it is a directory with files in it that the mount would hide.
// A missing dir, an empty directory and a dead onebox mount (a killed
// agent's, detached by New) are free.
func InUse(dir string) error {
	real := realPath(dir)
	if fstype, ok := mountedAt(real); ok {
		if fstype != "fuse.onebox" {
			return fmt.Errorf("cfs: %s is already a mount point (%s)", dir, fstype)
		}
		err := probe(dir)
		if errors.Is(err, errNoAnswer) {
			return fmt.Errorf("cfs: %s %w", dir, err)
		}
		if !errors.Is(err, syscall.ENOTCONN) && !errors.Is(err, syscall.ECONNABORTED) {
			return fmt.Errorf("cfs: %s is mounted by another running onebox agent", dir)
		}
		return nil
	}
	f, err := os.Open(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cfs: mount point: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("cfs: mount point: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("cfs: %s is not a directory", dir)
	}
	if _, err := f.Readdirnames(1); err != io.EOF {
		return fmt.Errorf("cfs: %s is a directory with files in it, which the mount would hide", dir)
	}
	return nil
}

// mountedAt is the type of the topmost filesystem mounted at mountpoint,
// from /proc/self/mountinfo.
func mountedAt(mountpoint string) (fstype string, ok bool) {
	ms := mountsAt(mountpoint)
	if len(ms) == 0 {
		return "", false
	}
	return ms[len(ms)-1].fstype, true
}
