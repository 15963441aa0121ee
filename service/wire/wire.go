// Package wire is the header exchanged on the fabric's service protocol
// (ALPN onebox-svc/1) before the bytes of a proxied connection: the
// exposing agent asks the target's agent to connect to a local port (or
// only to check it could), and the target's agent answers with a status.
//
// Version 2: a fabric connection starts with one request of KindSession
// (port 0, no gid); after a StatusOK reply it carries a session of
// multiplexed streams (package service/mux; the exposing agent is the
// client), each starting with its own KindConnect or KindCheck request
// and reply, as a whole connection did in version 1.
//
// Request, client to server:
//
//	"OBSV" | version (1) | kind (1) | port (2, big-endian) | len (1) | gid (len bytes)
//
// Reply, server to client:
//
//	status (1) | len (2, big-endian) | message (len bytes, UTF-8)
//
// After a reply with StatusOK to KindConnect, the stream carries the
// proxied bytes in both directions and nothing else. Every other reply ends
// the stream (or, to KindSession, the connection).
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// Version is the only header version this package speaks (2: streams
// multiplexed over one session per pair of nodes; 1 was one fabric
// connection per proxied connection).
const Version = 2

var magic = [4]byte{'O', 'B', 'S', 'V'}

// Kind says what the client wants.
type Kind uint8

const (
	// KindConnect asks for a connection to the port; on StatusOK the
	// stream carries its bytes.
	KindConnect Kind = 1
	// KindCheck asks whether a connection to the port would succeed now
	// (an active health check); the server connects, closes and replies.
	KindCheck Kind = 2
	// KindSession opens a session (port 0, no gid): on StatusOK the fabric
	// connection carries multiplexed streams, each starting with a request
	// of KindConnect or KindCheck.
	KindSession Kind = 3
)

// Status is the server's answer.
type Status uint8

const (
	StatusOK        Status = 0
	StatusRefused   Status = 1 // nothing accepts connections on the port
	StatusNoProcess Status = 2 // the process named by GID does not run on this node
	StatusBad       Status = 3 // malformed or unsupported request
	StatusTimeout   Status = 4 // the local connect did not finish in time
	StatusUnavail   Status = 5 // the agent is shutting down
)

func (s Status) String() string {
	switch s {
	case StatusOK:
		return "ok"
	case StatusRefused:
		return "refused"
	case StatusNoProcess:
		return "no_process"
	case StatusBad:
		return "bad_request"
	case StatusTimeout:
		return "timeout"
	case StatusUnavail:
		return "unavailable"
	}
	return fmt.Sprintf("status_%d", uint8(s))
}

// MaxGID bounds the process id field; global ids are 13 bytes today.
const MaxGID = 32

// MaxMessage bounds a reply's message.
const MaxMessage = 1024

// Request is the client's header.
type Request struct {
	Kind Kind
	Port uint16
	GID  string // if set, the port must belong to this process's node (and the process must run there)
}

// ErrBadHeader wraps every decoding failure.
var ErrBadHeader = errors.New("wire: bad service header")

// Validate checks the fields an encoder is given.
func (r Request) Validate() error {
	if r.Kind != KindConnect && r.Kind != KindCheck && r.Kind != KindSession {
		return fmt.Errorf("%w: unknown kind %d", ErrBadHeader, r.Kind)
	}
	if r.Kind == KindSession {
		if r.Port != 0 || r.GID != "" {
			return fmt.Errorf("%w: a session request names no port and no gid", ErrBadHeader)
		}
		return nil
	}
	if r.Port == 0 {
		return fmt.Errorf("%w: port 0", ErrBadHeader)
	}
	if len(r.GID) > MaxGID {
		return fmt.Errorf("%w: gid of %d bytes (at most %d)", ErrBadHeader, len(r.GID), MaxGID)
	}
	for i := 0; i < len(r.GID); i++ {
		if c := r.GID[i]; c < 0x21 || c > 0x7e {
			return fmt.Errorf("%w: gid holds byte %#x", ErrBadHeader, c)
		}
	}
	return nil
}

// AppendRequest appends r's encoding to b.
func AppendRequest(b []byte, r Request) ([]byte, error) {
	if err := r.Validate(); err != nil {
		return b, err
	}
	b = append(b, magic[:]...)
	b = append(b, Version, byte(r.Kind))
	b = binary.BigEndian.AppendUint16(b, r.Port)
	b = append(b, byte(len(r.GID)))
	return append(b, r.GID...), nil
}

// ReadRequest reads one request header from r. It reads exactly the
// header's bytes, never more, so the stream's payload stays unread.
func ReadRequest(r io.Reader) (Request, error) {
	var h [9]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Request{}, fmt.Errorf("%w: %v", ErrBadHeader, err)
	}
	if [4]byte(h[:4]) != magic {
		return Request{}, fmt.Errorf("%w: wrong magic", ErrBadHeader)
	}
	if h[4] != Version {
		return Request{}, fmt.Errorf("%w: version %d (this agent speaks %d: run the same onebox release on every node)", ErrBadHeader, h[4], Version)
	}
	req := Request{Kind: Kind(h[5]), Port: binary.BigEndian.Uint16(h[6:8])}
	n := int(h[8])
	if n > MaxGID {
		return Request{}, fmt.Errorf("%w: gid of %d bytes (at most %d)", ErrBadHeader, n, MaxGID)
	}
	if n > 0 {
		gid := make([]byte, n)
		if _, err := io.ReadFull(r, gid); err != nil {
			return Request{}, fmt.Errorf("%w: %v", ErrBadHeader, err)
		}
		req.GID = string(gid)
	}
	if err := req.Validate(); err != nil {
		return Request{}, err
	}
	return req, nil
}

// Reply is the server's answer.
type Reply struct {
	Status  Status
	Message string // why, for any status but OK
}

// Err turns a reply into an error (nil for StatusOK).
func (r Reply) Err() error {
	if r.Status == StatusOK {
		return nil
	}
	return &ReplyError{Reply: r}
}

// ReplyError is a non-OK reply.
type ReplyError struct{ Reply Reply }

func (e *ReplyError) Error() string {
	if e.Reply.Message == "" {
		return e.Reply.Status.String()
	}
	return e.Reply.Message
}

// AppendReply appends r's encoding to b; a message longer than MaxMessage
// is cut (at a rune boundary).
func AppendReply(b []byte, r Reply) []byte {
	msg := r.Message
	if len(msg) > MaxMessage {
		msg = msg[:MaxMessage]
		for len(msg) > 0 && !utf8.ValidString(msg) {
			msg = msg[:len(msg)-1]
		}
	}
	b = append(b, byte(r.Status))
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

// ReadReply reads one reply from r, exactly its bytes.
func ReadReply(r io.Reader) (Reply, error) {
	var h [3]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Reply{}, fmt.Errorf("%w: reply: %v", ErrBadHeader, err)
	}
	n := int(binary.BigEndian.Uint16(h[1:]))
	if n > MaxMessage {
		return Reply{}, fmt.Errorf("%w: reply message of %d bytes (at most %d)", ErrBadHeader, n, MaxMessage)
	}
	rep := Reply{Status: Status(h[0])}
	if n > 0 {
		msg := make([]byte, n)
		if _, err := io.ReadFull(r, msg); err != nil {
			return Reply{}, fmt.Errorf("%w: reply: %v", ErrBadHeader, err)
		}
		if !utf8.Valid(msg) {
			return Reply{}, fmt.Errorf("%w: reply message is not UTF-8", ErrBadHeader)
		}
		rep.Message = string(msg)
	}
	return rep, nil
}
