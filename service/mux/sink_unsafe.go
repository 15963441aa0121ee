package mux

import (
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// writeNow writes as much of p to rc's socket as it takes without
// blocking (the socket is non-blocking, as every socket of Go's network
// poller), or, if wait > 0, as it takes within wait (polling for room),
// and returns how much that was; an error (a closed or reset connection)
// ends the attempt, and the caller queues the rest for the goroutine that
// writes with waiting.
func writeNow(rc syscall.RawConn, p []byte, wait time.Duration) int {
	n := 0
	var deadline time.Time
	rc.Write(func(fd uintptr) bool {
		for n < len(p) {
			m, err := syscall.Write(int(fd), p[n:])
			if err == syscall.EINTR {
				continue
			}
			if m > 0 {
				n += m
				continue
			}
			if err != syscall.EAGAIN || wait <= 0 {
				break
			}
			if deadline.IsZero() {
				deadline = time.Now().Add(wait)
			}
			left := time.Until(deadline)
			if left <= 0 {
				break
			}
			ts := unix.NsecToTimespec(left.Nanoseconds())
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			if _, err := unix.Ppoll(fds, &ts, nil); err != nil && err != unix.EINTR {
				break
			}
		}
		return true // never park on Go's poller: the caller queues the rest
	})
	return n
}
