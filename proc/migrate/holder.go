package migrate

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// HolderCommand is the hidden onebox subcommand that runs HolderMain.
const HolderCommand = "__criu-restore-holder"

// HolderStatus is one line the holder writes on its status pipe (fd 3):
// first Restored or Error, then, when the program ends, Exit.
type HolderStatus struct {
	Restored bool   `json:"restored,omitempty"`
	Error    string `json:"error,omitempty"`
	Exit     bool   `json:"exit,omitempty"`
	Code     int    `json:"code,omitempty"`
	Signal   int    `json:"signal,omitempty"`
}

// HolderMain is the holder process: the agent starts it (in a fresh PID
// and mount namespace when the program's PID is taken on this node) with
// the status pipe as fd 3 and the files the restore inherits as fds 4, 5,
// .... It runs `criu restore -d -S` (args: the CRIU binary and its
// arguments, which name the inherited files as fds 3, 4, ...), so the
// restored program becomes the holder's own child; it waits for the
// program and reports how it ended. Why a holder: CRIU restores the
// program's parent-death signal, and with the agent's programs that is
// SIGKILL, so the program's parent must be a process that lives as long
// as the program (CRIU itself exits after a detached restore); and in a
// fresh PID namespace the first process is its init, which must stay.
func HolderMain(args []string) int {
	status := os.NewFile(3, "status")
	enc := json.NewEncoder(status)
	fail := func(format string, a ...any) int {
		_ = enc.Encode(HolderStatus{Error: fmt.Sprintf(format, a...)})
		return 1
	}
	newpid, wait := false, false
	for len(args) > 0 && args[0] != "--" {
		switch args[0] {
		case "--newpid":
			newpid = true
		case "--wait":
			wait = true
		default:
			return fail("holder: unknown flag %q", args[0])
		}
		args = args[1:]
	}
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) < 1 {
		return fail("holder: usage: %s [--newpid] [--wait] -- CRIU ARGS...", HolderCommand)
	}
	// Signals are for the program's process group, not for the holder.
	signal.Ignore(syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGPIPE)
	if newpid {
		// The namespace's own /proc, for CRIU; mounts stay private to it.
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
			return fail("holder: make mounts private: %v", err)
		}
		if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return fail("holder: mount /proc: %v", err)
		}
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fail("holder: subreaper: %v", err)
	}
	// --wait: started ahead (its start-up off the program's downtime),
	// the holder restores when a byte arrives on stdin; EOF cancels.
	if wait {
		var b [1]byte
		if n, _ := os.Stdin.Read(b[:]); n != 1 {
			return fail("holder: restore cancelled")
		}
	}
	// The restored program's parent is the thread that started CRIU (-S:
	// CLONE_PARENT), and its parent-death signal fires when that thread
	// ends: keep it for the holder's life.
	runtime.LockOSThread()
	var inherit []*os.File
	for fd := 4; ; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			break
		}
		inherit = append(inherit, os.NewFile(uintptr(fd), fmt.Sprintf("inherit-%d", fd)))
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.ExtraFiles = inherit
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, nil, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fail("holder: start criu: %v", err)
	}
	for _, f := range inherit {
		f.Close()
	}
	if err := cmd.Wait(); err != nil {
		return fail("criu restore: %v", err)
	}
	root := ChildOf(os.Getpid())
	if root == 0 {
		return fail("criu restore succeeded but no restored process is there")
	}
	_ = enc.Encode(HolderStatus{Restored: true})
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fail("holder: wait: %v", err)
		}
		if pid != root {
			continue
		}
		st := HolderStatus{Exit: true}
		if ws.Signaled() {
			st.Signal = int(ws.Signal())
		} else {
			st.Code = ws.ExitStatus()
		}
		_ = enc.Encode(st)
		return 0
	}
}
