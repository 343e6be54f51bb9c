//! One stream between a host process (a Unix socket) and a guest socket,
//! with virtio-vsock's credit flow control in both directions.
//!
//! Credit: each side tells the other, in every packet, how big its receive
//! buffer is (`buf_alloc`) and how many bytes it has taken out of it so far
//! (`fwd_cnt`); a sender may have at most `buf_alloc` bytes in flight. This
//! side's buffer is `to_host` (what the guest sent that the host socket has
//! not taken yet), bounded by [`BUF_ALLOC`]: a guest that sends past its
//! credit is reset, never buffered without bound. What this side reads
//! from the host socket is bounded by the guest's credit.
//!
//! The connection never blocks: its socket is non-blocking, the muxer
//! watches it for what [`Connection::interest`] says, and everything to
//! tell the guest waits in flags until [`Connection::next_rx`] is asked
//! for a packet (when the guest has given a receive buffer).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{shutdown, Header, Op, Packet, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};

/// This side's receive buffer for one connection, in bytes.
pub const BUF_ALLOC: u32 = 64 * 1024;
/// The guest is told of freed buffer space once this much has been freed
/// since it was last told (in any packet).
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// A connection's address: the host side's port and the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub local_port: u32,
    pub peer_port: u32,
}

impl Key {
    /// The key of the connection a packet from the guest belongs to.
    pub fn of_guest_packet(header: &Header) -> Self {
        Self {
            local_port: header.dst_port,
            peer_port: header.src_port,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The host asked (`CONNECT port`); the guest has not answered yet
    /// (`since` the request went to the guest: a guest that is not taking
    /// packets, after a restore, is not timed out meanwhile).
    AwaitingGuest {
        since: Option<Instant>,
    },
    Established,
}

/// One connection and what it still has to tell the guest.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    key: Key,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes of the guest's taken by the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_told: Wrapping<u32>,
    /// `OK <port>\n` for the host once the guest accepted (not data, so
    /// not counted in `fwd_cnt`).
    preamble: Vec<u8>,
    to_host: VecDeque<u8>,
    /// The host socket has signalled data (or an end): read it when the
    /// guest has credit and a buffer.
    readable: bool,
    /// The host socket hung up: no more events will come for it.
    hung_up: bool,
    host_eof: bool,
    host_write_shut: bool,
    guest_sends_no_more: bool,
    guest_reads_no_more: bool,
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    send_shutdown: Option<u32>,
    send_rst: bool,
    /// Nothing more to do: the muxer drops the connection (and so closes
    /// the host socket).
    finished: bool,
    /// Set by the muxer: the connection is in its receive queue.
    pub(super) queued: bool,
    /// Set by the muxer: what the socket is registered for in its epoll.
    pub(super) registered: Option<EventSet>,
}

impl Connection {
    fn new(stream: UnixStream, key: Key, state: State) -> Self {
        Self {
            stream,
            key,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            preamble: Vec::new(),
            to_host: VecDeque::new(),
            readable: false,
            hung_up: false,
            host_eof: false,
            host_write_shut: false,
            guest_sends_no_more: false,
            guest_reads_no_more: false,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_shutdown: None,
            send_rst: false,
            finished: false,
            queued: false,
            registered: None,
        }
    }

    /// A connection the host asked for: the guest is sent a `REQUEST`.
    pub fn from_host(stream: UnixStream, key: Key) -> Self {
        let mut connection = Self::new(stream, key, State::AwaitingGuest { since: None });
        connection.send_request = true;
        connection
    }

    /// A connection the guest asked for (`request`), which the host
    /// accepted: the guest is sent a `RESPONSE`.
    pub fn from_guest(stream: UnixStream, request: &Header) -> Self {
        let mut connection = Self::new(stream, Key::of_guest_packet(request), State::Established);
        connection.take_credit(request);
        connection.send_response = true;
        connection
    }

    pub fn key(&self) -> Key {
        self.key
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether the host asked and the guest has not answered yet.
    pub fn is_awaiting_guest(&self) -> bool {
        matches!(self.state, State::AwaitingGuest { .. })
    }

    /// When the guest was asked, while it has not answered.
    pub fn awaiting_guest_since(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingGuest { since } => since,
            State::Established => None,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn is_hung_up(&self) -> bool {
        self.hung_up
    }

    /// What the muxer watches the host socket for.
    pub fn interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.send_rst || self.finished {
            return events;
        }
        if self.state == State::Established
            && !self.readable
            && !self.host_eof
            && !self.guest_reads_no_more
        {
            events |= EventSet::IN;
        }
        if !self.preamble.is_empty() || !self.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.guest_reads_no_more
            && self.peer_credit() > 0
    }

    /// Whether [`Connection::next_rx`] has something for the guest.
    pub fn has_rx(&self) -> bool {
        if self.finished {
            return false;
        }
        self.send_rst
            || self.send_request
            || self.send_response
            || self.can_read_host()
            || self.send_shutdown.is_some()
            || self.send_credit_update
    }

    /// Resets the connection: the guest is sent `RST`, the host socket is
    /// shut at once (the host must not wait for a guest that may never
    /// take the reset), and whatever was buffered is dropped.
    pub fn kill(&mut self) {
        if self.finished {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        if self.send_request {
            // The guest never heard of it: nothing to tell.
            self.finished = true;
            return;
        }
        self.send_rst = true;
        self.readable = false;
        self.preamble.clear();
        self.to_host.clear();
    }

    /// The host socket is readable (or at its end).
    pub fn on_readable(&mut self) {
        self.readable = true;
    }

    /// The host socket is writable.
    pub fn on_writable(&mut self) {
        self.flush();
    }

    /// The host socket hung up or failed: what it still holds is read
    /// (no event will say so again), and writing to it fails.
    pub fn on_hang_up(&mut self) {
        self.hung_up = true;
        if self.is_awaiting_guest() {
            // The host gave up before the guest answered.
            return self.kill();
        }
        self.readable = true;
        self.flush();
    }

    fn take_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// A packet from the guest for this connection.
    pub fn on_guest_packet(&mut self, packet: &Packet) {
        if self.finished || self.send_rst {
            return;
        }
        let header = &packet.header;
        let Some(op) = header.op() else {
            self.kill();
            return;
        };
        if op == Op::Rst {
            self.finished = true;
            return;
        }
        self.take_credit(header);
        match (op, self.state) {
            (Op::Response, State::AwaitingGuest { .. }) => {
                self.state = State::Established;
                self.preamble = format!("OK {}\n", self.key.local_port).into_bytes();
                self.flush();
            }
            (Op::Rw, State::Established) if !self.guest_sends_no_more => {
                if self.to_host.len() + packet.payload.len() > BUF_ALLOC as usize {
                    log::warn!(
                        "vsock: guest port {} sent past its credit: connection reset",
                        self.key.peer_port
                    );
                    self.kill();
                    return;
                }
                self.to_host.extend(&packet.payload);
                self.flush();
            }
            (Op::CreditUpdate, State::Established) => {}
            (Op::CreditRequest, State::Established) => self.send_credit_update = true,
            (Op::Shutdown, State::Established) => {
                self.guest_reads_no_more |= header.flags & shutdown::RCV != 0;
                self.guest_sends_no_more |= header.flags & shutdown::SEND != 0;
                if self.guest_reads_no_more {
                    self.readable = false;
                }
                self.flush();
            }
            // A second REQUEST, a RESPONSE to nothing, data before the
            // connection is up or after the guest said it was done.
            _ => self.kill(),
        }
    }

    /// Writes what the host socket will take; resets the connection if it
    /// cannot take anything ever again.
    fn flush(&mut self) {
        if self.send_rst || self.finished {
            return;
        }
        while !self.preamble.is_empty() {
            match self.stream.write(&self.preamble) {
                Ok(0) => return self.kill(),
                Ok(written) => {
                    self.preamble.drain(..written);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.kill(),
            }
        }
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return self.kill(),
                Ok(written) => {
                    self.to_host.drain(..written);
                    self.fwd_cnt += Wrapping(written as u32);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.kill(),
            }
        }
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= CREDIT_UPDATE_THRESHOLD {
            self.send_credit_update = true;
        }
        if !self.to_host.is_empty() {
            return;
        }
        if self.guest_sends_no_more && !self.host_write_shut {
            // The host reads an end; it may still send.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        // The guest closed its socket (it waits for a RST), or both sides
        // are done sending: the connection ends.
        if self.guest_sends_no_more && (self.guest_reads_no_more || self.host_eof) {
            self.send_rst = true;
        }
    }

    fn header(&mut self, guest_cid: u64, op: Op, flags: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        self.send_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op: op.code(),
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn control(&mut self, guest_cid: u64, op: Op, flags: u32) -> Option<Packet> {
        Some(Packet {
            header: self.header(guest_cid, op, flags),
            payload: Vec::new(),
        })
    }

    /// The next packet for the guest, with at most `max_payload` bytes of
    /// data; None when there is nothing to send now.
    pub fn next_rx(&mut self, guest_cid: u64, max_payload: usize) -> Option<Packet> {
        if self.finished {
            return None;
        }
        if self.send_rst {
            self.finished = true;
            return self.control(guest_cid, Op::Rst, 0);
        }
        if self.send_request {
            self.send_request = false;
            self.state = State::AwaitingGuest {
                since: Some(Instant::now()),
            };
            return self.control(guest_cid, Op::Request, 0);
        }
        if self.send_response {
            self.send_response = false;
            return self.control(guest_cid, Op::Response, 0);
        }
        if self.can_read_host() {
            let want = max_payload
                .min(MAX_PAYLOAD)
                .min(self.peer_credit() as usize);
            let mut data = vec![0u8; want];
            match self.stream.read(&mut data) {
                Ok(0) if want > 0 => {
                    self.host_eof = true;
                    self.readable = false;
                    self.send_shutdown = Some(shutdown::SEND);
                    self.flush();
                }
                Ok(read) => {
                    // A hung-up socket gets no more events: read it on.
                    self.readable = self.hung_up;
                    data.truncate(read);
                    self.rx_cnt += Wrapping(read as u32);
                    let mut header = self.header(guest_cid, Op::Rw, 0);
                    header.len = read as u32;
                    return Some(Packet {
                        header,
                        payload: data,
                    });
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => self.readable = false,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.kill();
                    self.finished = true;
                    return self.control(guest_cid, Op::Rst, 0);
                }
            }
            if self.send_rst {
                self.finished = true;
                return self.control(guest_cid, Op::Rst, 0);
            }
        }
        if let Some(flags) = self.send_shutdown.take() {
            return self.control(guest_cid, Op::Shutdown, flags);
        }
        if self.send_credit_update {
            return self.control(guest_cid, Op::CreditUpdate, 0);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_CID: u64 = 3;

    fn guest_header(op: Op, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 52,
            len: 0,
            kind: TYPE_STREAM,
            op: op.code(),
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn guest(op: Op, payload: &[u8]) -> Packet {
        let mut header = guest_header(op, 0, 1 << 20, 0);
        header.len = payload.len() as u32;
        Packet {
            header,
            payload: payload.to_vec(),
        }
    }

    /// A guest-initiated connection and the host's end of its socket.
    fn established() -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut connection =
            Connection::from_guest(ours, &guest_header(Op::Request, 0, 1 << 20, 0));
        let response = connection.next_rx(GUEST_CID, 4096).unwrap();
        assert_eq!(response.header.op(), Some(Op::Response));
        assert_eq!(response.header.dst_port, 5000);
        assert_eq!(response.header.src_port, 52);
        (connection, host)
    }

    fn ops(connection: &mut Connection) -> Vec<Op> {
        std::iter::from_fn(|| connection.next_rx(GUEST_CID, 4096))
            .map(|packet| packet.header.op().unwrap())
            .collect()
    }

    #[test]
    fn data_flows_both_ways_within_credit() {
        let (mut connection, mut host) = established();
        connection.on_guest_packet(&guest(Op::Rw, b"ping"));
        let mut got = [0u8; 4];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");

        host.write_all(b"pong").unwrap();
        assert!(connection.interest().contains(EventSet::IN));
        connection.on_readable();
        assert!(!connection.interest().contains(EventSet::IN), "disarmed");
        let packet = connection.next_rx(GUEST_CID, 4096).unwrap();
        assert_eq!(packet.header.op(), Some(Op::Rw));
        assert_eq!(packet.payload, b"pong");
        assert_eq!(
            packet.header.fwd_cnt, 4,
            "the host took the guest's 4 bytes"
        );
        assert!(connection.interest().contains(EventSet::IN), "re-armed");
    }

    #[test]
    fn reading_the_host_stops_at_the_guests_credit() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut connection = Connection::from_guest(ours, &guest_header(Op::Request, 0, 10, 0));
        connection.next_rx(GUEST_CID, 4096);
        host.write_all(&[7u8; 100]).unwrap();
        connection.on_readable();
        assert_eq!(
            connection.next_rx(GUEST_CID, 4096).unwrap().payload.len(),
            10
        );
        connection.on_readable();
        assert!(!connection.has_rx(), "no credit left");
        assert_eq!(connection.next_rx(GUEST_CID, 4096), None);
        // The guest read 4 bytes: 4 more may go.
        connection.on_guest_packet(&Packet {
            header: guest_header(Op::CreditUpdate, 0, 10, 4),
            payload: Vec::new(),
        });
        assert!(connection.has_rx());
        assert_eq!(
            connection.next_rx(GUEST_CID, 4096).unwrap().payload.len(),
            4
        );
    }

    #[test]
    fn a_guest_sending_past_its_credit_is_reset() {
        let (mut connection, host) = established();
        // The host reads nothing: the buffer fills.
        let chunk = vec![1u8; 32 * 1024];
        for _ in 0..64 {
            connection.on_guest_packet(&guest(Op::Rw, &chunk));
            if connection.send_rst {
                break;
            }
        }
        assert!(connection.to_host.is_empty(), "the buffer was dropped");
        assert_eq!(ops(&mut connection), [Op::Rst]);
        assert!(connection.is_finished());
        drop(host);
    }

    #[test]
    fn freed_space_is_told_to_the_guest() {
        let (mut connection, mut host) = established();
        let chunk = vec![1u8; CREDIT_UPDATE_THRESHOLD as usize];
        connection.on_guest_packet(&guest(Op::Rw, &chunk));
        let mut sink = vec![0u8; chunk.len()];
        host.read_exact(&mut sink).unwrap();
        let packet = connection.next_rx(GUEST_CID, 4096).unwrap();
        assert_eq!(packet.header.op(), Some(Op::CreditUpdate));
        assert_eq!(packet.header.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
        assert_eq!(packet.header.buf_alloc, BUF_ALLOC);
        connection.on_guest_packet(&guest(Op::CreditRequest, b""));
        assert_eq!(ops(&mut connection), [Op::CreditUpdate]);
    }

    #[test]
    fn a_host_request_waits_for_the_guests_answer() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = Key {
            local_port: 1 << 30,
            peer_port: 52,
        };
        let mut connection = Connection::from_host(ours, key);
        assert!(connection.is_awaiting_guest());
        assert_eq!(connection.awaiting_guest_since(), None, "not asked yet");
        assert_eq!(connection.interest(), EventSet::empty(), "no data before");
        let request = connection.next_rx(GUEST_CID, 4096).unwrap();
        assert_eq!(request.header.op(), Some(Op::Request));
        assert_eq!(request.header.dst_port, 52);
        assert_eq!(request.header.src_port, 1 << 30);
        assert!(connection.awaiting_guest_since().is_some());
        let mut response = guest_header(Op::Response, 0, 1 << 20, 0);
        response.src_port = 52;
        response.dst_port = 1 << 30;
        connection.on_guest_packet(&Packet {
            header: response,
            payload: Vec::new(),
        });
        assert!(!connection.is_awaiting_guest());
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
    }

    #[test]
    fn data_before_the_answer_resets() {
        let (ours, _host) = UnixStream::pair().unwrap();
        let key = Key {
            local_port: 1 << 30,
            peer_port: 52,
        };
        let mut connection = Connection::from_host(ours, key);
        connection.next_rx(GUEST_CID, 4096);
        connection.on_guest_packet(&guest(Op::Rw, b"early"));
        assert_eq!(ops(&mut connection), [Op::Rst]);
    }

    #[test]
    fn half_close_from_the_host_then_the_guest_ends_the_connection() {
        let (mut connection, mut host) = established();
        host.shutdown(Shutdown::Write).unwrap();
        connection.on_readable();
        assert_eq!(ops(&mut connection), [Op::Shutdown]);
        assert!(!connection.is_finished(), "the guest may still send");
        connection.on_guest_packet(&guest(Op::Rw, b"reply"));
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"reply");
        let mut done = guest(Op::Shutdown, b"");
        done.header.flags = shutdown::SEND;
        connection.on_guest_packet(&done);
        assert_eq!(ops(&mut connection), [Op::Rst]);
        assert!(connection.is_finished());
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the host read an end");
    }

    #[test]
    fn a_guest_close_is_answered_with_a_reset_after_its_data() {
        let (mut connection, mut host) = established();
        connection.on_guest_packet(&guest(Op::Rw, b"last words"));
        let mut close = guest(Op::Shutdown, b"");
        close.header.flags = shutdown::SEND | shutdown::RCV;
        connection.on_guest_packet(&close);
        assert_eq!(ops(&mut connection), [Op::Rst]);
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
    }

    #[test]
    fn a_guest_reset_ends_the_connection_silently() {
        let (mut connection, _host) = established();
        connection.on_guest_packet(&guest(Op::Rst, b""));
        assert!(connection.is_finished());
        assert_eq!(ops(&mut connection), []);
    }

    #[test]
    fn a_host_that_went_away_resets_the_connection() {
        let (mut connection, host) = established();
        drop(host);
        connection.on_hang_up();
        // Reading finds the end, the guest is told, and writing fails.
        assert_eq!(ops(&mut connection), [Op::Shutdown]);
        connection.on_guest_packet(&guest(Op::Rw, b"anyone?"));
        assert_eq!(ops(&mut connection), [Op::Rst]);
    }

    #[test]
    fn unknown_and_out_of_place_ops_reset() {
        for op in [Op::Request, Op::Response] {
            let (mut connection, _host) = established();
            connection.on_guest_packet(&guest(op, b""));
            assert_eq!(ops(&mut connection), [Op::Rst], "{op:?}");
        }
        let (mut connection, _host) = established();
        let mut bad = guest(Op::Rw, b"");
        bad.header.op = 99;
        connection.on_guest_packet(&bad);
        assert_eq!(ops(&mut connection), [Op::Rst]);
    }
}
