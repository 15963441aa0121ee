// Package uffd is the userfaultfd glue the memory pager needs: the ioctl
// numbers and structures of <linux/userfaultfd.h> (golang.org/x/sys/unix has
// none) and the fault message decoder.
//
// The values are those measured on the target kernel (docs in
// /work/shared/notes/machine-facts.md); uffd_test.go asserts the structure
// sizes so a layout mistake fails a test rather than corrupting memory.
package uffd

import (
	"encoding/binary"
	"errors"
)

// Ioctl numbers and constants from <linux/userfaultfd.h>.
const (
	API        = 0xaa
	IoctlAPI   = 0xc018aa3f
	IoctlCopy  = 0xc028aa03
	IoctlZero  = 0xc020aa04
	IoctlWake  = 0x8010aa02
	IoctlUnreg = 0x8010aa01
	IoctlWP    = 0xc018aa06

	// Features asked for in UFFDIO_API (the shim asks; listed for tests).
	FeatureMissingShmem = 1 << 5
	FeatureWPShmem      = 1 << 12

	// CopyModeWP maps a filled page write-protected: its first write
	// then raises a WP fault (dirty tracking).
	CopyModeWP = 1 << 1

	EventPagefault = 0x12
	EventFork      = 0x13
	EventRemap     = 0x14
	EventRemove    = 0x15
	EventUnmap     = 0x16

	PagefaultFlagWrite = 1 << 0
	PagefaultFlagWP    = 1 << 1

	// MsgSize is sizeof(struct uffd_msg).
	MsgSize = 32
)

// Msg is a decoded struct uffd_msg. For EventPagefault, Address is the
// faulting address and Flags the UFFD_PAGEFAULT_FLAG_* bits.
type Msg struct {
	Event   uint8
	Flags   uint64
	Address uint64
}

// ErrShortMsg is returned by ParseMsg for fewer than MsgSize bytes.
var ErrShortMsg = errors.New("uffd: short message")

// ParseMsg decodes one uffd_msg: event (u8), 7 reserved bytes, then for a
// page fault flags (u64) and address (u64).
func ParseMsg(b []byte) (Msg, error) {
	if len(b) < MsgSize {
		return Msg{}, ErrShortMsg
	}
	return Msg{
		Event:   b[0],
		Flags:   binary.NativeEndian.Uint64(b[8:16]),
		Address: binary.NativeEndian.Uint64(b[16:24]),
	}, nil
}
