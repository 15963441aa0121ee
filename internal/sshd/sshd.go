// Package sshd runs a private OpenSSH server on 127.0.0.1 for the
// benchmarks that compare onebox with what users run instead (sshfs,
// ssh -L): its own port, host key and authorized user key in a temporary
// directory, started with -f /dev/null so the system's sshd configuration
// is not read, key authentication only. It serves root, the only user the
// benchmarks run as.
package sshd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/onebox-project/onebox/testbed"
)

// Path is the sshd binary, "" if there is none.
func Path() string {
	if p, err := exec.LookPath("sshd"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/sbin/sshd"); err == nil {
		return "/usr/sbin/sshd"
	}
	return ""
}

// StopTimeout is how long Stop waits after each signal.
const StopTimeout = 5 * time.Second

// Server is a running private sshd.
type Server struct {
	Addr    string // 127.0.0.1:PORT
	Port    int
	UserKey string // the private key the server accepts for root

	dir     string // temporary: keys, log
	cmd     *exec.Cmd
	done    chan struct{}
	runSSHD bool // /run/sshd was created here
}

// Start starts sshd with the given extra options (each an sshd_config
// line, passed with -o) and waits up to timeout for it to listen.
func Start(ctx context.Context, timeout time.Duration, options ...string) (s *Server, err error) {
	s = &Server{}
	defer func() {
		if err != nil {
			s.Close()
			s = nil
		}
	}()
	if Path() == "" {
		return s, errors.New("sshd: no sshd binary (apt-get install openssh-server)")
	}
	if s.dir, err = os.MkdirTemp("", "obx-sshd"); err != nil {
		return s, err
	}
	hostKey := filepath.Join(s.dir, "host_key")
	s.UserKey = filepath.Join(s.dir, "user_key")
	for _, k := range []string{hostKey, s.UserKey} {
		if out, err := exec.CommandContext(ctx, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "onebox-bench", "-f", k).CombinedOutput(); err != nil {
			return s, fmt.Errorf("ssh-keygen: %w: %s", err, out)
		}
	}
	pub, err := os.ReadFile(s.UserKey + ".pub")
	if err != nil {
		return s, err
	}
	authKeys := filepath.Join(s.dir, "authorized_keys")
	if err := os.WriteFile(authKeys, pub, 0o600); err != nil {
		return s, err
	}
	// sshd refuses to start without its privilege separation directory.
	if _, err := os.Stat("/run/sshd"); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir("/run/sshd", 0o755); err == nil {
			s.runSSHD = true
		}
	}
	if s.Port, err = testbed.FreePort(); err != nil {
		return s, err
	}
	s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port))
	logf, err := os.Create(filepath.Join(s.dir, "sshd.log"))
	if err != nil {
		return s, err
	}
	defer logf.Close()
	args := []string{"-D", "-e", "-f", "/dev/null",
		"-o", "ListenAddress=127.0.0.1", "-o", "Port=" + strconv.Itoa(s.Port),
		"-o", "HostKey=" + hostKey, "-o", "AuthorizedKeysFile=" + authKeys,
		"-o", "PidFile=none", "-o", "StrictModes=no", "-o", "UsePAM=no",
		"-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
		"-o", "PermitRootLogin=prohibit-password", "-o", "LogLevel=ERROR"}
	for _, o := range options {
		args = append(args, "-o", o)
	}
	s.cmd = exec.Command(Path(), args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return s, fmt.Errorf("sshd: %w", err)
	}
	s.done = WaitChan(s.cmd)
	if err := WaitListen(ctx, s.Addr, s.done, timeout); err != nil {
		return s, fmt.Errorf("sshd: %w: %s", err, s.Log())
	}
	return s, nil
}

// Log is what sshd wrote so far.
func (s *Server) Log() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "sshd.log"))
	return strings.TrimSpace(string(b))
}

// Close stops sshd and removes its temporary directory.
func (s *Server) Close() {
	Stop(s.cmd, s.done, syscall.SIGTERM)
	if s.runSSHD {
		_ = os.Remove("/run/sshd")
	}
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
}

// WaitChan returns a channel closed when the started cmd has exited.
func WaitChan(cmd *exec.Cmd) chan struct{} {
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	return done
}

// Stop signals cmd (started, with done from WaitChan) and waits up to
// StopTimeout, then kills it and waits up to StopTimeout more.
func Stop(cmd *exec.Cmd, done chan struct{}, sig syscall.Signal) {
	if cmd == nil || cmd.Process == nil || done == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
		return
	case <-time.After(StopTimeout):
	}
	_ = cmd.Process.Kill()
	select {
	case <-done:
	case <-time.After(StopTimeout):
	}
}

// WaitListen waits up to timeout until addr accepts connections; it fails
// at once when exited is closed.
func WaitListen(ctx context.Context, addr string, exited chan struct{}, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		select {
		case <-exited:
			return errors.New("exited")
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not listening on %s after %v", addr, timeout)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
