package mux

import "syscall"

// writeNow writes as much of p to rc's socket as it takes without
// blocking (the socket is non-blocking, as every socket of Go's network
// poller) and returns how much that was; an error (EAGAIN: the socket
// buffer is full; a closed or reset connection) ends the attempt, and the
// caller queues the rest for the goroutine that writes with waiting.
func writeNow(rc syscall.RawConn, p []byte) int {
	n := 0
	rc.Write(func(fd uintptr) bool {
		for n < len(p) {
			m, err := syscall.Write(int(fd), p[n:])
			if err == syscall.EINTR {
				continue
			}
			if err != nil || m <= 0 {
				break
			}
			n += m
		}
		return true // never wait for the socket to be writable
	})
	return n
}
