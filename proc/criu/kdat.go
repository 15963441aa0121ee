package criu

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// KdatCache is where CRIU keeps what it learnt about the kernel. Without
// it every CRIU command probes the kernel again, 20-40 ms here, and a
// migration starts CRIU three times (dump, lazy-pages, restore), two of
// them while the program is stopped.
//
// CRIU loads the cache from wherever /run is, but only writes it when /run
// is a tmpfs (systemd hosts). On a host where /run is a plain directory the
// cache would never exist, so PrimeKdat has CRIU write it inside a private
// mount namespace with a tmpfs on /run, and copies it out.
const KdatCache = "/run/criu.kdat"

// KdatCommand is the hidden onebox subcommand that runs KdatMain.
const KdatCommand = "__criu-kdat"

// maxKdat bounds the cache file read from the helper (CRIU's is ~1 KiB).
const maxKdat = 1 << 20

// PrimeKdat makes sure CRIU's kernel cache exists for this boot. self is
// the onebox executable (it runs KdatCommand in a mount namespace of its
// own). It reports whether it wrote the cache; a cache newer than the boot
// is left alone (CRIU checks the boot id itself, and ignores a stale one).
func (b Binary) PrimeKdat(ctx context.Context, self string) (bool, error) {
	if fresh(KdatCache) {
		return false, nil
	}
	if os.Geteuid() != 0 {
		return false, errors.New("criu kdat: needs root")
	}
	cmd := exec.CommandContext(ctx, self, KdatCommand, b.Path)
	// Go makes the new namespace's mounts private before exec, so the
	// helper's tmpfs on /run is seen by nobody else.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &limited{&out, maxKdat}, &limited{&errb, 4096}
	if err := cmd.Run(); err != nil {
		return false, fmt.Errorf("criu kdat: %w: %s", err, strings.TrimSpace(errb.String()))
	}
	if out.Len() == 0 || out.Len() >= maxKdat {
		return false, fmt.Errorf("criu kdat: the helper gave %d bytes", out.Len())
	}
	if err := os.MkdirAll(filepath.Dir(KdatCache), 0o755); err != nil {
		return false, err
	}
	// A file of its own, renamed into place: agents that start together
	// never leave a torn cache.
	f, err := os.CreateTemp(filepath.Dir(KdatCache), ".criu.kdat.onebox-*")
	if err != nil {
		return false, fmt.Errorf("criu kdat: %w", err)
	}
	_, err = f.Write(out.Bytes())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), KdatCache)
	}
	if err != nil {
		os.Remove(f.Name())
		return false, fmt.Errorf("criu kdat: %w", err)
	}
	return true, nil
}

// KdatMain runs inside PrimeKdat's mount namespace: it mounts a tmpfs on
// /run, lets CRIU (args[0]) probe the kernel and save its cache there,
// and writes the cache to stdout. It returns the exit status.
func KdatMain(args []string) int {
	if len(args) != 1 {
		fmt.Fprintf(os.Stderr, "usage: onebox %s CRIU\n", KdatCommand)
		return 2
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		fmt.Fprintf(os.Stderr, "make mounts private: %v\n", err)
		return 1
	}
	if err := unix.Mount("onebox-kdat", "/run", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755,size=1m"); err != nil {
		fmt.Fprintf(os.Stderr, "mount a tmpfs on /run: %v\n", err)
		return 1
	}
	var errb bytes.Buffer
	c := exec.Command(args[0], "check")
	c.Stdout, c.Stderr = &errb, &errb
	if err := c.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "criu check: %v: %s\n", err, strings.TrimSpace(errb.String()))
		return 1
	}
	b, err := os.ReadFile(KdatCache)
	if err != nil {
		fmt.Fprintf(os.Stderr, "criu check wrote no cache: %v\n", err)
		return 1
	}
	if _, err := os.Stdout.Write(b); err != nil {
		return 1
	}
	return 0
}

// fresh reports whether path exists and was written since this boot.
func fresh(path string) bool {
	st, err := os.Stat(path)
	if err != nil || st.Size() == 0 {
		return false
	}
	boot, err := bootTime()
	if err != nil {
		return false
	}
	return st.ModTime().After(boot)
}

// bootTime reads btime from /proc/stat.
func bootTime() (time.Time, error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return time.Time{}, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "btime "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return time.Time{}, err
			}
			return time.Unix(n, 0), nil
		}
	}
	return time.Time{}, errors.New("no btime in /proc/stat")
}

// limited keeps at most n bytes and counts one more past them, so the
// caller sees an over-long output as such.
type limited struct {
	b *bytes.Buffer
	n int
}

func (l *limited) Write(p []byte) (int, error) {
	if room := l.n - l.b.Len(); room > 0 {
		l.b.Write(p[:min(len(p), room)])
	} else if l.b.Len() == l.n {
		l.b.WriteByte(0)
	}
	return len(p), nil
}
