package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/onebox-project/onebox/internal/sshd"
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
	if sshd.Path() == "" {
		return ErrNoSSH
	}
	return nil
}

// sshTunnel is what a user would set up instead of a service address: an
// 'ssh -N -L' port forward to the target, through a private sshd on
// 127.0.0.1 (its own port, host key and authorized key in a temporary
// directory; sshd -f /dev/null and ssh -F /dev/null, so neither the
// system's sshd configuration nor root's ~/.ssh is read or written).
type sshTunnel struct {
	Addr string // the forwarded local port
	sshd *sshd.Server
	ssh  *exec.Cmd
	done chan struct{}
}

const sshStartTimeout = 15 * time.Second

func startSSHTunnel(ctx context.Context, target int) (s *sshTunnel, err error) {
	s = &sshTunnel{}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if s.sshd, err = sshd.Start(ctx, sshStartTimeout, "AllowTcpForwarding=yes"); err != nil {
		return s, err
	}
	local, err := testbed.FreePort()
	if err != nil {
		return s, err
	}
	var sshLog bytes.Buffer
	s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(local))
	s.ssh = exec.Command("ssh", "-N", "-F", "/dev/null", "-p", strconv.Itoa(s.sshd.Port),
		"-o", "IdentityFile="+s.sshd.UserKey, "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
		"-L", s.Addr+":127.0.0.1:"+strconv.Itoa(target), "root@127.0.0.1")
	s.ssh.Stdout, s.ssh.Stderr = &sshLog, &sshLog
	s.ssh.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.ssh.Start(); err != nil {
		return s, fmt.Errorf("ssh: %w", err)
	}
	s.done = sshd.WaitChan(s.ssh)
	if err := sshd.WaitListen(ctx, s.Addr, s.done, sshStartTimeout); err != nil {
		return s, fmt.Errorf("ssh -L: %w: %s", err, strings.TrimSpace(sshLog.String()))
	}
	return s, nil
}

// Close stops ssh and sshd.
func (s *sshTunnel) Close() {
	sshd.Stop(s.ssh, s.done, syscall.SIGTERM)
	if s.sshd != nil {
		s.sshd.Close()
	}
}
