package pager

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/memory/pool"
	"github.com/onebox-project/onebox/memory/uffd"
)

// client is one connected process. Only its goroutine (run) uses it.
type client struct {
	p        *Pager
	id       uint64
	owner    string // pool owner of its reservations
	g        *group // the program it belongs to: the local limit
	wake     int    // eventfd: the group asks this process to evict
	pid      uint32
	sockf    *os.File
	sock     int
	uffd     int       // -1 until opHello
	regs     []*region // sorted by start, non-overlapping
	reserved uint64    // bytes reserved in the pool under owner

	resident int          // pages of regs resident
	res      atomic.Int64 // resident, for the group's other members
	fifo     []pageRef    // resident pages in fill order (clock hand at fifoHead)
	fifoHead int

	inherit *snapshot // the fork snapshot this process was born from
	snaps   []uint64  // tokens of snapshots made for children, maybe not adopted

	fillBuf, outBuf []byte
	victims         []pageRef

	// Readahead of a sequential stream, done while the uffd is idle:
	// pages [raNext, raEnd) of raRegion, write-enabled if raWrite (the
	// stream writes).
	raRegion      *region
	raNext, raEnd int // raNext: the next page to start loading
	raWrite       bool
	raJob         *raJob // the chunk loading, if any
	raBufs        [2][]byte
	raFlip        int
	raDone        int // eventfd: a readahead chunk finished loading

	// The block read or written as a stream (nil: none), the page of its
	// last fault, and the non-sequential faults since its last sequential
	// one: eviction takes the pages the stream has passed.
	sr     *region
	srPos  int
	srMiss int
}

type pageRef struct {
	r *region
	i int32
}

// spinFor is how long serve keeps reading an idle userfaultfd before it goes
// back to poll. Measured with TestFillIdentical -v, unpinned on 2 vCPUs:
// ~21-28 us per fault with 50 us of spinning, ~28-41 us without; pinned to
// one CPU (taskset -c 0), spinning costs instead (~18 against ~12.5 us).
var spinFor = 50 * time.Microsecond

// errGone means the program exited or closed its socket: not an error.
var errGone = errors.New("pager: program gone")

// errStop means the pager is closing.
var errStop = errors.New("pager: closing")

// errPool wraps the pool's failures.
var errPool = errors.New("pager: cluster memory pool")

func (c *client) run() {
	c.p.live.Add(1)
	defer c.p.live.Add(^uint64(0))
	var err error
	if c.wake, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
		c.wake = -1
	}
	if err == nil {
		if c.raDone, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
			c.raDone = -1
		}
	} else {
		c.raDone = -1
	}
	c.g.join(c) // after wake is set: other members read it
	if err == nil {
		err = c.loop()
	}
	if err != nil && !errors.Is(err, errGone) {
		reason := uint64(byeProtocol)
		switch {
		case errors.Is(err, errStop):
			reason = byeShutdown
		case errors.Is(err, errPool):
			reason = byePool
		}
		if reason != byeShutdown {
			c.p.dropped.Add(1)
			c.p.cfg.Logf("pager: client %d (pid %d) dropped: %v", c.id, c.pid, err)
		}
		// Best effort: a full socket buffer or a gone peer loses it.
		unix.SendmsgN(c.sock, encodeBye(reason), nil, nil, unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
	}
	c.sockf.Close() // the shim's watchdog sees the hang-up at once
	if c.raJob != nil {
		<-c.raJob.done // bounded by the pool timeout
	}
	for _, r := range c.regs {
		c.release(r)
	}
	c.regs = nil
	if c.uffd >= 0 {
		unix.Close(c.uffd)
	}
	if c.inherit != nil {
		c.inherit.releaseBlocks(c.p)
	}
	c.p.mu.Lock()
	var orphans []*snapshot
	for _, tok := range c.snaps {
		if s := c.p.snaps[tok]; s != nil {
			delete(c.p.snaps, tok)
			orphans = append(orphans, s)
		}
	}
	c.p.mu.Unlock()
	for _, s := range orphans {
		s.release(c.p)
	}
	if c.reserved > 0 {
		c.p.cfg.Pool.Release(c.owner, c.reserved)
	}
	c.g.leave(c) // before wake closes: nobody pokes it after
	if c.wake >= 0 {
		unix.Close(c.wake)
	}
	if c.raDone >= 0 { // after the last job is done: its goroutine wrote it before
		unix.Close(c.raDone)
	}
}

// loop polls the socket, the userfaultfd and the stop pipe until one of them
// ends. Close bounds it: closing the stop pipe wakes the poll.
func (c *client) loop() error {
	buf := make([]byte, 64*uffd.MsgSize)
	for {
		fds := []unix.PollFd{
			{Fd: int32(c.p.stopR.Fd()), Events: unix.POLLIN},
			{Fd: int32(c.sock), Events: unix.POLLIN},
			{Fd: int32(c.wake), Events: unix.POLLIN},
			{Fd: int32(c.raDone), Events: unix.POLLIN},
		}
		if c.uffd >= 0 {
			fds = append(fds, unix.PollFd{Fd: int32(c.uffd), Events: unix.POLLIN})
		}
		if _, err := unix.Poll(fds, -1); err != nil {
			if err == unix.EINTR {
				continue
			}
			return fmt.Errorf("poll: %w", err)
		}
		if fds[0].Revents != 0 {
			return errStop
		}
		if fds[1].Revents != 0 {
			if err := c.drain(); err != nil {
				return err
			}
		}
		if fds[2].Revents != 0 {
			var b [8]byte
			unix.Read(c.wake, b[:])
			if err := c.relieve(false); err != nil {
				return err
			}
		}
		ahead := false
		if fds[3].Revents != 0 {
			var b [8]byte
			unix.Read(c.raDone, b[:])
			ahead = true
		}
		if len(fds) > 4 && fds[4].Revents&(unix.POLLERR|unix.POLLHUP) != 0 {
			return errors.New("userfaultfd error")
		}
		if (len(fds) > 4 && fds[4].Revents != 0) || ahead {
			if err := c.serve(buf); err != nil {
				return err
			}
		}
	}
}

// drain handles every control message waiting on the socket.
func (c *client) drain() error {
	b := make([]byte, msgSize+1) // one spare byte exposes a long message
	oob := make([]byte, unix.CmsgSpace(4))
	for {
		n, oobn, flags, _, err := unix.Recvmsg(c.sock, b, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
		if err == unix.EAGAIN {
			return nil
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("recvmsg: %w", err)
		}
		if n == 0 {
			return errGone
		}
		fd := -1
		if oobn > 0 {
			fds, err := rights(oob[:oobn])
			if err != nil {
				return err
			}
			if len(fds) > 0 {
				fd = fds[0]
			}
			for _, extra := range fds[min(len(fds), 1):] {
				unix.Close(extra)
			}
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			closeFD(fd)
			return errors.New("truncated message")
		}
		m, err := parseMsg(b[:n])
		if err != nil {
			closeFD(fd)
			return err
		}
		errno, val, err := c.handle(m, fd)
		if err != nil {
			return err
		}
		if wantsReply(m.op) {
			// The shim waits for each reply before its next request:
			// a full socket means a program that does not read them,
			// and a blocking send would hold this goroutine (and Close)
			// for as long as it does not.
			if _, err := unix.SendmsgN(c.sock, encodeReply(int32(errno), val), nil, nil, unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT); err != nil {
				if err == unix.EAGAIN {
					return errors.New("the program does not read the pager's replies")
				}
				return errGone
			}
		}
	}
}

func rights(oob []byte) ([]int, error) {
	cms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control message: %w", err)
	}
	var fds []int
	for _, cm := range cms {
		r, err := unix.ParseUnixRights(&cm)
		if err != nil {
			continue
		}
		fds = append(fds, r...)
	}
	return fds, nil
}

func closeFD(fd int) {
	if fd >= 0 {
		unix.Close(fd)
	}
}

// handle applies one control message; it owns fd. It returns the errno and
// value of the reply, or an error that ends the client.
func (c *client) handle(m msg, fd int) (unix.Errno, uint64, error) {
	if m.op != opHello && c.uffd < 0 {
		closeFD(fd)
		return 0, 0, errors.New("message before hello")
	}
	switch m.op {
	case opHello:
		if c.uffd >= 0 || fd < 0 {
			closeFD(fd)
			return 0, 0, errors.New("unexpected hello")
		}
		if err := checkUffd(fd); err != nil {
			// serve reads it until EAGAIN: a blocking descriptor (a
			// pipe, a socket, a uffd without O_NONBLOCK) would block
			// this goroutine for good, and Close with it.
			closeFD(fd)
			return 0, 0, err
		}
		if m.start != 0 {
			c.p.mu.Lock()
			s := c.p.snaps[m.start]
			delete(c.p.snaps, m.start)
			c.p.mu.Unlock()
			if s == nil {
				closeFD(fd)
				return 0, 0, fmt.Errorf("hello with unknown fork token %d", m.start)
			}
			// The child takes over the reservation made at fork.
			c.inherit, c.owner, c.reserved = s, s.owner, s.reserved
		}
		c.uffd, c.pid = fd, m.pid
		c.p.clients.Add(1)
		return 0, 0, nil
	case opRegister:
		if fd < 0 {
			return 0, 0, errors.New("register without memfd")
		}
		return c.register(m.start, m.len, fd)
	case opUnregister:
		closeFD(fd)
		i := c.find(m.start)
		if i < 0 || c.regs[i].start != m.start {
			return 0, 0, fmt.Errorf("unregister of unknown block %#x", m.start)
		}
		r := c.regs[i]
		c.regs = append(c.regs[:i], c.regs[i+1:]...)
		c.release(r)
		c.p.cfg.Pool.Release(c.owner, r.len)
		c.reserved -= r.len
		return 0, 0, nil
	case opDiscard:
		closeFD(fd)
		return 0, 0, c.discard(m.start, m.len)
	case opFork:
		closeFD(fd)
		return c.fork()
	default: // opForkAbort
		closeFD(fd)
		c.p.mu.Lock()
		s := c.p.snaps[m.start]
		if s != nil && s.parent == c.id {
			delete(c.p.snaps, m.start)
		} else {
			s = nil
		}
		c.p.mu.Unlock()
		if s != nil {
			s.release(c.p)
		}
		return 0, 0, nil
	}
}

func (c *client) register(start, n uint64, memfd int) (unix.Errno, uint64, error) {
	ps := uint64(PageSize)
	var st unix.Stat_t
	switch {
	case n == 0 || start%ps != 0 || n%ps != 0 || start+n < start || n/ps > 1<<31:
		unix.Close(memfd)
		return 0, 0, fmt.Errorf("bad block %#x+%#x", start, n)
	case unix.Fstat(memfd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || uint64(st.Size) < n ||
		st.Nlink != 0 || !isShmem(memfd):
		// Eviction punches holes in it: only an anonymous memory file
		// will do, never a file of the file system.
		unix.Close(memfd)
		return 0, 0, fmt.Errorf("block %#x: descriptor is not a memfd of %d bytes", start, n)
	}
	if int64(len(c.regs)) >= c.p.blockCap.Load() {
		unix.Close(memfd)
		return 0, 0, fmt.Errorf("more than %d blocks registered", c.p.blockCap.Load())
	}
	i := sort.Search(len(c.regs), func(i int) bool { return c.regs[i].start >= start })
	if (i < len(c.regs) && c.regs[i].start < start+n) || (i > 0 && c.regs[i-1].start+c.regs[i-1].len > start) {
		unix.Close(memfd)
		return 0, 0, fmt.Errorf("block %#x+%#x overlaps a registered one", start, n)
	}
	if c.p.memfds.Add(1) > c.p.memfdCap.Load() {
		c.p.memfds.Add(-1)
		unix.Close(memfd)
		c.p.denied.Add(1)
		c.p.cfg.Logf("pager: pid %d: block %#x refused: the pager holds %d block descriptors already", c.pid, start, c.p.memfdCap.Load())
		return unix.ENOMEM, 0, nil
	}
	var inherited *snapBlock
	if c.inherit != nil {
		inherited = c.inherit.take(start, n)
	}
	if inherited == nil {
		ctx, cancel := c.p.ctx()
		err := c.p.cfg.Pool.Reserve(ctx, c.owner, n)
		cancel()
		if err != nil {
			unix.Close(memfd)
			c.p.memfds.Add(-1)
			c.p.denied.Add(1)
			if !errors.Is(err, pool.ErrFull) {
				c.p.cfg.Logf("pager: reserve %d bytes for pid %d: %v", n, c.pid, err)
			}
			return unix.ENOMEM, 0, nil
		}
		c.reserved += n
	}
	r := newRegion(c.p, start, n, memfd, inherited)
	c.regs = append(c.regs, nil)
	copy(c.regs[i+1:], c.regs[i:])
	c.regs[i] = r
	c.p.regions.Add(1)
	return 0, 0, nil
}

// checkUffd tells whether fd is a non-blocking userfaultfd.
func checkUffd(fd int) error {
	link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil || link != "anon_inode:[userfaultfd]" {
		return fmt.Errorf("hello: descriptor is not a userfaultfd (%q)", link)
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_NONBLOCK == 0 {
		return errors.New("hello: the userfaultfd is not O_NONBLOCK")
	}
	return nil
}

// isShmem tells whether fd's file lives in shared memory (memfd_create
// makes such files; TMPFS_MAGIC).
func isShmem(fd int) bool {
	var fs unix.Statfs_t
	return unix.Fstatfs(fd, &fs) == nil && fs.Type == unix.TMPFS_MAGIC
}

// find returns the index of the block holding addr, or -1.
func (c *client) find(addr uint64) int {
	i := sort.Search(len(c.regs), func(i int) bool { return c.regs[i].start+c.regs[i].len > addr })
	if i < len(c.regs) && c.regs[i].start <= addr {
		return i
	}
	return -1
}

// serve reads every waiting uffd message and handles the faults.
func (c *client) serve(buf []byte) error {
	var idleSince time.Time
	for {
		n, err := unix.Read(c.uffd, buf)
		if err == unix.EAGAIN && (c.raRegion != nil || c.raJob != nil) {
			// Idle: fill the pages a sequential stream will touch next,
			// while the program works on those it has.
			moved, err := c.readahead()
			if err != nil {
				return err
			}
			if moved {
				idleSince = time.Time{}
				continue
			}
			// A chunk is loading: wait for it as for a fault (its
			// goroutine pokes raDone), not spinning for ever, which
			// took the CPU the load itself needs on a small machine.
		}
		if err == unix.EAGAIN {
			// A program touching new memory faults again within
			// microseconds; going back to poll costs a cross-CPU wake-up
			// (~40-60 us here, machine-facts.md), so spin a little first.
			if spinFor <= 0 {
				return nil
			}
			if idleSince.IsZero() {
				idleSince = time.Now()
			} else if time.Since(idleSince) > spinFor {
				return nil
			}
			continue
		}
		idleSince = time.Time{}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read userfaultfd: %w", err)
		}
		for off := 0; off+uffd.MsgSize <= n; off += uffd.MsgSize {
			m, _ := uffd.ParseMsg(buf[off : off+uffd.MsgSize])
			if m.Event != uffd.EventPagefault {
				continue // no event features requested: not expected
			}
			if err := c.fault(m.Address, m.Flags); err != nil {
				return err
			}
		}
	}
}

// fault handles one page fault message.
func (c *client) fault(addr, flags uint64) error {
	ps := uint64(PageSize)
	page := addr &^ (ps - 1)
	i := c.find(page)
	if i < 0 {
		// The shim sends a block's registration before returning it, so
		// it is in the socket already: read it.
		if err := c.drain(); err != nil {
			return err
		}
		if i = c.find(page); i < 0 {
			// Guessing zeros here could hand the program wrong data.
			return fmt.Errorf("fault at %#x outside every registered block", addr)
		}
	}
	r := c.regs[i]
	pg := int((page - r.start) / ps)
	if flags&uffd.PagefaultFlagWP != 0 {
		return c.wpFault(r, pg)
	}
	if c.p.testStall != nil {
		c.p.testStall()
	}
	return c.fill(r, pg, flags&uffd.PagefaultFlagWrite != 0)
}
