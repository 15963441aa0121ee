package migrate

import (
	"io"
	"net"
)

func pipePair() (io.ReadWriteCloser, io.ReadWriteCloser) {
	a, b := net.Pipe()
	return a, b
}
