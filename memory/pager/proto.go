package pager

import (
	"encoding/binary"
	"fmt"
)

// The shim's messages (struct obx_msg and struct obx_reply in
// memory/shim/c/onebox_shim.c), one SOCK_SEQPACKET message each, host byte
// order. A request is 24 bytes, with a descriptor attached for opHello (the
// userfaultfd) and opRegister (the block's memfd). opHello, opRegister,
// opDiscard and opFork get a 16-byte reply: an errno value (0: done; ENOMEM:
// the pool cannot hold the block) and a value (opFork: the snapshot token).
const (
	opHello      = 1 // start: the fork token this process inherits, 0 for none
	opRegister   = 2 // a block [start, start+len) and its memfd
	opUnregister = 3 // the block at start is freed (no reply)
	opDiscard    = 4 // madvise(DONTNEED) of [start, start+len)
	opFork       = 5 // snapshot the blocks before fork; reply: the token
	opForkAbort  = 6 // start: the token of a fork that failed (no reply)

	msgSize   = 24
	replySize = 16

	// A goodbye is a reply-sized message the pager sends before it drops a
	// program: pad = byeMagic, val = the reason (bye*). The shim prints
	// the reason and stops the program.
	byeMagic    = 0xb1eb1e
	byePool     = 1 // the pool failed to fetch or store the program's pages
	byeProtocol = 2 // the shim broke the protocol (or the pager failed)
	byeShutdown = 3 // the agent is stopping
)

// maxBlocks is the shim's MAX_BLOCKS: it never has more blocks registered
// per process. A process registering more breaks the protocol (each block
// holds a memfd open in the agent).
const maxBlocks = 16384

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
	if m.op < opHello || m.op > opForkAbort {
		return msg{}, fmt.Errorf("pager: unknown op %d", m.op)
	}
	return m, nil
}

// wantsReply tells which requests the shim waits on.
func wantsReply(op uint32) bool {
	return op == opHello || op == opRegister || op == opDiscard || op == opFork
}

func encodeReply(errno int32, val uint64) []byte {
	b := make([]byte, replySize)
	binary.NativeEndian.PutUint32(b[0:4], uint32(errno))
	binary.NativeEndian.PutUint64(b[8:16], val)
	return b
}

func encodeBye(reason uint64) []byte {
	b := encodeReply(0, reason)
	binary.NativeEndian.PutUint32(b[4:8], byeMagic)
	return b
}
