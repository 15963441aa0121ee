package uffd

import (
	"errors"
	"os"
	"testing"
	"unsafe"

	"github.com/onebox-project/onebox/internal/testenv"
	"golang.org/x/sys/unix"
)

// The sizes of <linux/userfaultfd.h> on this kernel (machine-facts.md).
func TestStructSizes(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"uffdio_copy", unsafe.Sizeof(copyArg{}), 40},
		{"uffdio_zeropage", unsafe.Sizeof(zeroArg{}), 32},
		{"uffdio_api", unsafe.Sizeof(apiArg{}), 24},
		{"uffdio_range", unsafe.Sizeof(rangeArg{}), 16},
		{"uffdio_writeprotect", unsafe.Sizeof(wpArg{}), 24},
	} {
		if c.got != c.want {
			t.Errorf("sizeof(%s) = %d, want %d", c.name, c.got, c.want)
		}
	}
	// The ioctl numbers encode the argument size in bits 16-29.
	for _, c := range []struct {
		name string
		req  uintptr
		size uintptr
	}{
		{"UFFDIO_COPY", IoctlCopy, 40},
		{"UFFDIO_ZEROPAGE", IoctlZero, 32},
		{"UFFDIO_API", IoctlAPI, 24},
		{"UFFDIO_WAKE", IoctlWake, 16},
		{"UFFDIO_UNREGISTER", IoctlUnreg, 16},
		{"UFFDIO_WRITEPROTECT", IoctlWP, 24},
	} {
		if got := (c.req >> 16) & 0x3fff; got != c.size {
			t.Errorf("%s encodes size %d, want %d", c.name, got, c.size)
		}
	}
}

func TestParseMsg(t *testing.T) {
	b := make([]byte, MsgSize)
	b[0] = EventPagefault
	b[8] = PagefaultFlagWrite
	b[16], b[17] = 0x00, 0x10 // 0x1000
	m, err := ParseMsg(b)
	if err != nil || m.Event != EventPagefault || m.Flags != PagefaultFlagWrite || m.Address != 0x1000 {
		t.Fatalf("ParseMsg = %+v, %v", m, err)
	}
	if _, err := ParseMsg(b[:31]); !errors.Is(err, ErrShortMsg) {
		t.Fatalf("short: %v", err)
	}
}

// TestHandshake checks the kernel accepts our UFFDIO_API layout.
func TestHandshake(t *testing.T) {
	testenv.Need(t, os.Geteuid() == 0, "userfaultfd needs root here (vm.unprivileged_userfaultfd=0)")
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	testenv.Need(t, e == 0, "userfaultfd unusable: %v", e)
	defer unix.Close(int(fd))
	if _, err := Handshake(int(fd), 0); err != nil {
		t.Fatalf("UFFDIO_API: %v", err)
	}
}
