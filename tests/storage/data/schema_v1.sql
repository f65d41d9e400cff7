-- A version-1 SecureChat homeserver database (sqlite3 iterdump), generated at schema
-- version 1 with one account, device, device list and mailbox entry. Golden data for
-- tests/storage/test_federation_store.py::test_migration_v1_to_v2 -- never regenerate.
BEGIN TRANSACTION;
CREATE TABLE accounts (
	user VARCHAR(320) NOT NULL, 
	password_hash VARCHAR(512) NOT NULL, 
	master_key BLOB NOT NULL, 
	disabled BOOLEAN NOT NULL, 
	created_ms BIGINT NOT NULL, 
	PRIMARY KEY (user)
);
INSERT INTO "accounts" VALUES('alice@example.org','hash',X'4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D4D',0,1000);
CREATE TABLE blobs (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	ciphertext BLOB NOT NULL
);
INSERT INTO "blobs" VALUES(1,X'636970686572746578742D31');
CREATE TABLE claimed_prekeys (
	user VARCHAR(320) NOT NULL, 
	device_id VARCHAR(64) NOT NULL, 
	kind VARCHAR(8) NOT NULL, 
	key_id BIGINT NOT NULL, 
	expires_ms BIGINT NOT NULL, 
	PRIMARY KEY (user, device_id, kind, key_id)
);
CREATE TABLE device_lists (
	user VARCHAR(320) NOT NULL, 
	version BIGINT NOT NULL, 
	body BLOB NOT NULL, 
	signature BLOB NOT NULL, 
	updated_ms BIGINT NOT NULL, 
	PRIMARY KEY (user)
);
INSERT INTO "device_lists" VALUES('alice@example.org',1,X'6C6973742D626F6479',X'53535353535353535353535353535353535353535353535353535353535353535353535353535353535353535353535353535353535353535353535353535353',1000);
CREATE TABLE devices (
	user VARCHAR(320) NOT NULL, 
	device_id VARCHAR(64) NOT NULL, 
	identity_key BLOB NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	created_ms BIGINT NOT NULL, 
	PRIMARY KEY (user, device_id)
);
INSERT INTO "devices" VALUES('alice@example.org','AAAAAAAAAA',X'4949494949494949494949494949494949494949494949494949494949494949','active',1000);
CREATE TABLE invites (
	invite_id VARCHAR(12) NOT NULL, 
	token_hash BLOB NOT NULL, 
	created_ms BIGINT NOT NULL, 
	expires_ms BIGINT NOT NULL, 
	uses_left INTEGER NOT NULL, 
	note VARCHAR(1000) NOT NULL, 
	revoked BOOLEAN NOT NULL, 
	PRIMARY KEY (invite_id), 
	UNIQUE (token_hash)
);
CREATE TABLE mailbox (
	seq INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	device VARCHAR(400) NOT NULL, 
	sender VARCHAR(400) NOT NULL, 
	message_id VARCHAR(200) NOT NULL, 
	blob_id INTEGER NOT NULL, 
	ts_ms BIGINT NOT NULL, 
	expires_ms BIGINT NOT NULL, 
	FOREIGN KEY(blob_id) REFERENCES blobs (id)
);
INSERT INTO "mailbox" VALUES(1,'alice@example.org/AAAAAAAAAA','bob@example.org/BBBBBBBBBB','m1',1,2000,1000000002000);
CREATE TABLE message_ids (
	sender VARCHAR(400) NOT NULL, 
	message_id VARCHAR(200) NOT NULL, 
	digest BLOB NOT NULL, 
	expires_ms BIGINT NOT NULL, 
	PRIMARY KEY (sender, message_id)
);
INSERT INTO "message_ids" VALUES('bob@example.org/BBBBBBBBBB','m1',X'4444444444444444444444444444444444444444444444444444444444444444',1000000002000);
CREATE TABLE one_time_prekeys (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	user VARCHAR(320) NOT NULL, 
	device_id VARCHAR(64) NOT NULL, 
	key_id BIGINT NOT NULL, 
	encoded BLOB NOT NULL, 
	uploaded_ms BIGINT NOT NULL, 
	UNIQUE (user, device_id, key_id), 
	FOREIGN KEY(user, device_id) REFERENCES devices (user, device_id)
);
CREATE TABLE pq_prekeys (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	user VARCHAR(320) NOT NULL, 
	device_id VARCHAR(64) NOT NULL, 
	key_id BIGINT NOT NULL, 
	last_resort BOOLEAN NOT NULL, 
	encoded BLOB NOT NULL, 
	uploaded_ms BIGINT NOT NULL, 
	FOREIGN KEY(user, device_id) REFERENCES devices (user, device_id)
);
CREATE TABLE schema_version (
	version INTEGER NOT NULL
);
INSERT INTO "schema_version" VALUES(1);
CREATE TABLE signed_prekeys (
	user VARCHAR(320) NOT NULL, 
	device_id VARCHAR(64) NOT NULL, 
	key_id BIGINT NOT NULL, 
	encoded BLOB NOT NULL, 
	updated_ms BIGINT NOT NULL, 
	PRIMARY KEY (user, device_id), 
	FOREIGN KEY(user, device_id) REFERENCES devices (user, device_id)
);
CREATE INDEX ix_invites_expires_ms ON invites (expires_ms);
CREATE INDEX ix_claimed_prekeys_expires_ms ON claimed_prekeys (expires_ms);
CREATE INDEX ix_message_ids_expires_ms ON message_ids (expires_ms);
CREATE INDEX ix_one_time_prekeys_device ON one_time_prekeys (user, device_id, id);
CREATE INDEX ix_pq_prekeys_device ON pq_prekeys (user, device_id, last_resort, id);
CREATE INDEX ix_mailbox_blob_id ON mailbox (blob_id);
CREATE INDEX ix_mailbox_device_seq ON mailbox (device, seq);
CREATE INDEX ix_mailbox_expires_ms ON mailbox (expires_ms);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('blobs',1);
INSERT INTO "sqlite_sequence" VALUES('mailbox',1);
COMMIT;
