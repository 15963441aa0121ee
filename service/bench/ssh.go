package bench

import (
	"bytes"
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

// ErrNoSSH is returned when ssh, ssh-keygen or sshd is missing.
var ErrNoSSH = errors.New("the ssh -L comparison needs an OpenSSH client and server: apt-get install openssh-client openssh-server (or use --no-ssh to skip it)")

// CheckSSH returns ErrNoSSH if a program the ssh comparison needs is missing.
func CheckSSH() error {
	for _, p := range []string{"ssh", "ssh-keygen"} {
		if _, err := exec.LookPath(p); err != nil {
			return ErrNoSSH
		}
	}
	if sshdPath() == "" {
		return ErrNoSSH
	}
	return nil
}

func sshdPath() string {
	if p, err := exec.LookPath("sshd"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/sbin/sshd"); err == nil {
		return "/usr/sbin/sshd"
	}
	return ""
}

// sshTunnel is what a user would set up instead of a service address: an
// 'ssh -N -L' port forward to the target, through a private sshd on
// 127.0.0.1 (its own port, host key and authorized key in a temporary
// directory; sshd -f /dev/null and ssh -F /dev/null, so neither the
// system's sshd configuration nor root's ~/.ssh is read or written).
type sshTunnel struct {
	Addr           string // the forwarded local port
	dir            string
	sshd, ssh      *exec.Cmd
	sshdDone, done chan struct{}
	runSSHD        bool // /run/sshd was created here
}

const sshStartTimeout = 15 * time.Second

func startSSHTunnel(ctx context.Context, target int) (s *sshTunnel, err error) {
	s = &sshTunnel{}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if s.dir, err = os.MkdirTemp("", "obx-sshl"); err != nil {
		return s, err
	}
	hostKey, userKey := filepath.Join(s.dir, "host_key"), filepath.Join(s.dir, "user_key")
	for _, k := range []string{hostKey, userKey} {
		if out, err := exec.CommandContext(ctx, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "onebox-bench", "-f", k).CombinedOutput(); err != nil {
			return s, fmt.Errorf("ssh-keygen: %w: %s", err, out)
		}
	}
	pub, err := os.ReadFile(userKey + ".pub")
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
	sshdPort, err1 := testbed.FreePort()
	local, err2 := testbed.FreePort()
	if err := errors.Join(err1, err2); err != nil {
		return s, err
	}
	var sshdLog bytes.Buffer
	s.sshd = exec.Command(sshdPath(), "-D", "-e", "-f", "/dev/null",
		"-o", "ListenAddress=127.0.0.1", "-o", "Port="+strconv.Itoa(sshdPort),
		"-o", "HostKey="+hostKey, "-o", "AuthorizedKeysFile="+authKeys,
		"-o", "PidFile=none", "-o", "StrictModes=no", "-o", "UsePAM=no",
		"-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
		"-o", "PermitRootLogin=prohibit-password", "-o", "AllowTcpForwarding=yes", "-o", "LogLevel=ERROR")
	s.sshd.Stdout, s.sshd.Stderr = &sshdLog, &sshdLog
	s.sshd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.sshd.Start(); err != nil {
		return s, fmt.Errorf("sshd: %w", err)
	}
	s.sshdDone = waitChan(s.sshd)
	if err := waitListen(ctx, net.JoinHostPort("127.0.0.1", strconv.Itoa(sshdPort)), s.sshdDone); err != nil {
		return s, fmt.Errorf("sshd: %w: %s", err, strings.TrimSpace(sshdLog.String()))
	}
	var sshLog bytes.Buffer
	s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(local))
	s.ssh = exec.Command("ssh", "-N", "-F", "/dev/null", "-p", strconv.Itoa(sshdPort),
		"-o", "IdentityFile="+userKey, "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
		"-L", s.Addr+":127.0.0.1:"+strconv.Itoa(target), "root@127.0.0.1")
	s.ssh.Stdout, s.ssh.Stderr = &sshLog, &sshLog
	s.ssh.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.ssh.Start(); err != nil {
		return s, fmt.Errorf("ssh: %w", err)
	}
	s.done = waitChan(s.ssh)
	if err := waitListen(ctx, s.Addr, s.done); err != nil {
		return s, fmt.Errorf("ssh -L: %w: %s", err, strings.TrimSpace(sshLog.String()))
	}
	return s, nil
}

// waitListen waits until addr accepts connections, or exited is closed.
func waitListen(ctx context.Context, addr string, exited chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, sshStartTimeout)
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
			return fmt.Errorf("not listening on %s after %v", addr, sshStartTimeout)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func waitChan(cmd *exec.Cmd) chan struct{} {
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	return done
}

// stop sends SIGTERM, waits up to 5 s, then kills.
func stop(cmd *exec.Cmd, done chan struct{}) {
	if cmd == nil || cmd.Process == nil || done == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
		return
	case <-time.After(5 * time.Second):
	}
	_ = cmd.Process.Kill()
	<-done
}

// Close stops ssh and sshd and removes the temporary directory.
func (s *sshTunnel) Close() {
	stop(s.ssh, s.done)
	stop(s.sshd, s.sshdDone)
	if s.runSSHD {
		_ = os.Remove("/run/sshd")
	}
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
}
