package uffd

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// copyArg is struct uffdio_copy.
type copyArg struct {
	dst, src, len, mode uint64
	copied              int64
}

// zeroArg is struct uffdio_zeropage.
type zeroArg struct {
	start, len, mode uint64
	zeroed           int64
}

// rangeArg is struct uffdio_range.
type rangeArg struct {
	start, len uint64
}

// apiArg is struct uffdio_api.
type apiArg struct {
	api, features, ioctls uint64
}

// wpArg is struct uffdio_writeprotect.
type wpArg struct {
	start, len, mode uint64
}

// Copy fills len(src) bytes at dst in the faulting process with src and wakes
// its waiting threads (UFFDIO_COPY). It returns the raw errno: the caller
// decides what EEXIST, EAGAIN, ESRCH and ENOENT mean.
func Copy(fd int, dst uint64, src []byte) error {
	_, err := CopyMode(fd, dst, src, 0)
	return err
}

// CopyMode is Copy with UFFDIO_COPY_MODE_* bits (CopyModeWP). It also
// returns how many bytes were copied before an error (a run stops at the
// first page already present: EEXIST).
func CopyMode(fd int, dst uint64, src []byte, mode uint64) (int, error) {
	if len(src) == 0 {
		return 0, unix.EINVAL
	}
	a := copyArg{dst: dst, src: uint64(uintptr(unsafe.Pointer(&src[0]))), len: uint64(len(src)), mode: mode}
	err := ioctl(fd, IoctlCopy, unsafe.Pointer(&a))
	if err == nil {
		return len(src), nil
	}
	return max(int(a.copied), 0), err
}

// WriteProtect write-protects [start, start+n) of the faulting process when
// protect is true (later writes raise WP faults), or removes the
// protection and wakes the threads waiting on it (UFFDIO_WRITEPROTECT).
func WriteProtect(fd int, start, n uint64, protect bool) error {
	a := wpArg{start: start, len: n}
	if protect {
		a.mode = 1 // UFFDIO_WRITEPROTECT_MODE_WP
	}
	return ioctl(fd, IoctlWP, unsafe.Pointer(&a))
}

// ZeroPage maps zero pages over [start, start+n) and wakes the waiters
// (UFFDIO_ZEROPAGE). Errors as for Copy.
func ZeroPage(fd int, start, n uint64) error {
	a := zeroArg{start: start, len: n}
	return ioctl(fd, IoctlZero, unsafe.Pointer(&a))
}

// Wake wakes the threads waiting on faults in [start, start+n) without
// filling anything (UFFDIO_WAKE): they retry their access.
func Wake(fd int, start, n uint64) error {
	a := rangeArg{start: start, len: n}
	return ioctl(fd, IoctlWake, unsafe.Pointer(&a))
}

// Handshake does UFFDIO_API on a fresh uffd asking for features and returns
// those the kernel offers.
func Handshake(fd int, features uint64) (uint64, error) {
	a := apiArg{api: API, features: features}
	if err := ioctl(fd, IoctlAPI, unsafe.Pointer(&a)); err != nil {
		return 0, err
	}
	return a.features, nil
}

func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if e != 0 {
		return e
	}
	return nil
}
