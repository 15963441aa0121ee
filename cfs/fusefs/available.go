package fusefs

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"

	"github.com/onebox-project/onebox/fabric/resources"
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
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent major:minor root mountpoint options ... - fstype source super
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || resources.UnescapeMountField(fields[4]) != mountpoint {
			continue
		}
		for i, fl := range fields {
			if fl == "-" && i+1 < len(fields) {
				fstype, ok = fields[i+1], true // later lines are mounted on top
				break
			}
		}
	}
	return fstype, ok
}
