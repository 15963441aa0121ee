package pager

import (
	"encoding/binary"
	"fmt"
)

// The shim's messages (struct obx_msg in memory/shim/onebox_shim.c): one
// SOCK_SEQPACKET message of 24 bytes in host byte order, with a descriptor
// attached for opHello (the userfaultfd) and opRegister (the block's memfd).
const (
	opHello      = 1
	opRegister   = 2
	opUnregister = 3

	msgSize = 24
)

type msg struct {
	op, pid    uint32
	start, len uint64
}

func parseMsg(b []byte) (msg, error) {
	if len(b) != msgSize {
		return msg{}, fmt.Errorf("pager: message of %d bytes, want %d", len(b), msgSize)
	}
	m := msg{
		op:    binary.NativeEndian.Uint32(b[0:4]),
		pid:   binary.NativeEndian.Uint32(b[4:8]),
		start: binary.NativeEndian.Uint64(b[8:16]),
		len:   binary.NativeEndian.Uint64(b[16:24]),
	}
	if m.op < opHello || m.op > opUnregister {
		return msg{}, fmt.Errorf("pager: unknown op %d", m.op)
	}
	return m, nil
}
