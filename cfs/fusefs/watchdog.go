package fusefs

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/onebox-project/onebox/fabric/resources"
	"golang.org/x/sys/unix"
)

// A mount made with DirectMount outlives a killed agent as a dead mount
// (every access fails with ENOTCONN) until someone unmounts it. fusermount
// has "auto_unmount" for this: a helper process that unmounts when the
// file system's process is gone. The watchdog is the same idea: a child
// process (the onebox binary, WatchdogCommand) that holds the read end of
// a pipe and lazily unmounts when it reads EOF, i.e. when the agent exited
// however it exited. It unmounts only the mount it was started for (by
// mount id), so it cannot take down the mount of an agent restarted
// meanwhile on the same directory.

// WatchdogCommand is the hidden CLI verb that runs RunWatchdog.
const WatchdogCommand = "cfs-unmount-on-exit"

// watchdog is a running watchdog process.
type watchdog struct {
	cmd *exec.Cmd
	w   *os.File
}

// startWatchdog starts exe WatchdogCommand MOUNTPOINT MOUNTID.
func startWatchdog(exe, mountpoint string) (*watchdog, error) {
	id, ok := mountID(mountpoint)
	if !ok {
		return nil, fmt.Errorf("cfs: %s is not in the mount table", mountpoint)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, WatchdogCommand, mountpoint, strconv.Itoa(id))
	cmd.Args[0] = "onebox" // what ps shows; the binary is exe
	cmd.Stdin = r
	// Its own process group: a Ctrl-C meant for the agent's group must not
	// end the watchdog before the agent.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("cfs: start unmount watchdog: %w", err)
	}
	r.Close()
	return &watchdog{cmd: cmd, w: w}, nil
}

// stop ends the watchdog (after a clean unmount it finds nothing to do).
func (w *watchdog) stop() {
	w.w.Close()
	done := make(chan struct{})
	go func() { w.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		w.cmd.Process.Kill()
	}
}

// RunWatchdog waits for EOF on r, then lazily unmounts mountpoint if the
// mount with id mntID is still there.
func RunWatchdog(mountpoint string, mntID int, r io.Reader) error {
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	_, _ = io.Copy(io.Discard, r)
	if id, ok := mountID(mountpoint); !ok || id != mntID {
		return nil
	}
	if err := unix.Unmount(mountpoint, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
		return fmt.Errorf("cfs: unmount %s: %w", mountpoint, err)
	}
	return nil
}

// mountID finds the id of the topmost onebox FUSE mount at mountpoint in
// /proc/self/mountinfo.
func mountID(mountpoint string) (int, bool) {
	id, found := 0, false
	for _, m := range mountsAt(mountpoint) {
		if m.fstype == "fuse.onebox" {
			id, found = m.id, true // later lines are mounted on top
		}
	}
	return id, found
}

// mountAt is a line of /proc/self/mountinfo.
type mountAt struct {
	id     int
	fstype string
}

// mountsAt lists the mounts at mountpoint in /proc/self/mountinfo, in its
// order (a later one is mounted on top of an earlier one).
func mountsAt(mountpoint string) []mountAt {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []mountAt
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent major:minor root mountpoint options ... - fstype source super
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || resources.UnescapeMountField(fields[4]) != mountpoint {
			continue
		}
		id, err := strconv.Atoi(fields[0])
		if err != nil {
			continue
		}
		if sep := slices.Index(fields, "-"); sep >= 0 && sep+1 < len(fields) {
			out = append(out, mountAt{id: id, fstype: fields[sep+1]})
		}
	}
	return out
}
