package pager

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/memory/uffd"
)

// region is one block of a program, as registered by the shim.
type region struct {
	start, len uint64
	memfd      int
	alias      []byte // the same pages mapped here; never touched in this slice
}

// client is one connected program. Only its goroutine (run) uses it.
type client struct {
	p     *Pager
	id    uint64
	pid   uint32
	sockf *os.File
	sock  int
	uffd  int       // -1 until opHello
	regs  []*region // sorted by start, non-overlapping
}

// spinFor is how long serve keeps reading an idle userfaultfd before it goes
// back to poll. Measured with TestFillIdentical -v, unpinned on 2 vCPUs:
// ~21-28 us per fault with 50 us of spinning, ~28-41 us without; pinned to
// one CPU (taskset -c 0), spinning costs instead (~18 against ~12.5 us).
var spinFor = 50 * time.Microsecond

// errGone means the program exited or closed its socket: not an error.
var errGone = errors.New("pager: program gone")

func (c *client) run() {
	err := c.loop()
	if err != nil && !errors.Is(err, errGone) {
		c.p.dropped.Add(1)
		c.p.logf("pager: client %d (pid %d) dropped: %v", c.id, c.pid, err)
	}
	for _, r := range c.regs {
		c.release(r)
	}
	if c.uffd >= 0 {
		unix.Close(c.uffd)
	}
	c.sockf.Close() // the shim's watchdog sees the hang-up
}

// loop polls the socket, the userfaultfd and the stop pipe until one of them
// ends. Close bounds it: closing the stop pipe wakes the poll.
func (c *client) loop() error {
	buf := make([]byte, 64*uffd.MsgSize)
	for {
		fds := []unix.PollFd{
			{Fd: int32(c.p.stopR.Fd()), Events: unix.POLLIN},
			{Fd: int32(c.sock), Events: unix.POLLIN},
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
			return errGone
		}
		if fds[1].Revents != 0 {
			if err := c.drain(); err != nil {
				return err
			}
		}
		if len(fds) > 2 && fds[2].Revents != 0 {
			if fds[2].Revents&(unix.POLLERR|unix.POLLHUP) != 0 {
				return errors.New("userfaultfd error")
			}
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
		if err := c.handle(m, fd); err != nil {
			return err
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

// handle applies one control message; it owns fd.
func (c *client) handle(m msg, fd int) error {
	switch m.op {
	case opHello:
		if c.uffd >= 0 || fd < 0 {
			closeFD(fd)
			return errors.New("unexpected hello")
		}
		c.uffd, c.pid = fd, m.pid
		c.p.clients.Add(1)
		return nil
	case opRegister:
		if c.uffd < 0 || fd < 0 {
			closeFD(fd)
			return errors.New("register before hello or without memfd")
		}
		return c.register(m.start, m.len, fd)
	default: // opUnregister
		closeFD(fd)
		i := c.find(m.start)
		if i < 0 || c.regs[i].start != m.start {
			return fmt.Errorf("unregister of unknown block %#x", m.start)
		}
		r := c.regs[i]
		c.regs = append(c.regs[:i], c.regs[i+1:]...)
		c.release(r)
		return nil
	}
}

func (c *client) register(start, n uint64, memfd int) error {
	ps := uint64(PageSize)
	var st unix.Stat_t
	switch {
	case n == 0 || start%ps != 0 || n%ps != 0 || start+n < start:
		unix.Close(memfd)
		return fmt.Errorf("bad block %#x+%#x", start, n)
	case unix.Fstat(memfd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || uint64(st.Size) < n:
		unix.Close(memfd)
		return fmt.Errorf("block %#x: descriptor is not a memfd of %d bytes", start, n)
	}
	i := sort.Search(len(c.regs), func(i int) bool { return c.regs[i].start >= start })
	if (i < len(c.regs) && c.regs[i].start < start+n) || (i > 0 && c.regs[i-1].start+c.regs[i-1].len > start) {
		unix.Close(memfd)
		return fmt.Errorf("block %#x+%#x overlaps a registered one", start, n)
	}
	alias, err := unix.Mmap(memfd, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(memfd)
		return fmt.Errorf("alias mapping of %#x: %w", start, err)
	}
	r := &region{start: start, len: n, memfd: memfd, alias: alias}
	c.regs = append(c.regs, nil)
	copy(c.regs[i+1:], c.regs[i:])
	c.regs[i] = r
	c.p.regions.Add(1)
	return nil
}

func (c *client) release(r *region) {
	unix.Munmap(r.alias)
	unix.Close(r.memfd)
	if f, ok := c.p.store.(Forgetter); ok {
		f.Forget(RegionID{Client: c.id, Start: r.start})
	}
}

// find returns the index of the block holding addr, or -1.
func (c *client) find(addr uint64) int {
	i := sort.Search(len(c.regs), func(i int) bool { return c.regs[i].start+c.regs[i].len > addr })
	if i < len(c.regs) && c.regs[i].start <= addr {
		return i
	}
	return -1
}

// serve reads every waiting uffd message and fills the faulting pages.
func (c *client) serve(buf []byte) error {
	var idleSince time.Time
	for {
		n, err := unix.Read(c.uffd, buf)
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
			if err := c.fault(m.Address); err != nil {
				return err
			}
		}
	}
}

func (c *client) fault(addr uint64) error {
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
	var data []byte
	if c.p.store != nil {
		r := c.regs[i]
		var ok bool
		if data, ok = c.p.store.Get(RegionID{Client: c.id, Start: r.start}, page-r.start); ok && len(data) != PageSize {
			return fmt.Errorf("store returned %d bytes for a page", len(data))
		} else if !ok {
			data = nil
		}
	}
	for tries := 0; ; tries++ {
		var err error
		if data != nil {
			err = uffd.Copy(c.uffd, page, data)
		} else {
			err = uffd.ZeroPage(c.uffd, page, ps)
		}
		switch err {
		case nil, unix.EEXIST: // EEXIST: another fault on the page won
		case unix.EAGAIN: // the mm is changing: try again, not for ever
			if tries < 1000 {
				runtime.Gosched()
				continue
			}
			return fmt.Errorf("fill page %#x: %w after %d tries", page, err, tries)
		case unix.ESRCH: // the program's mm is gone: it exited
			return errGone
		case unix.ENOENT:
			// The range is no longer registered (freed while a thread
			// touched it: a use after free). Wake the thread: its retry
			// faults as it would without onebox.
			uffd.Wake(c.uffd, page, ps)
			c.p.faults.Add(1)
			return nil
		default:
			return fmt.Errorf("fill page %#x: %w", page, err)
		}
		break
	}
	c.p.faults.Add(1)
	switch {
	case data != nil:
		c.p.copies.Add(1)
	default:
		c.p.zeroed.Add(1)
	}
	return nil
}
